"""Fashion-MNIST look-alikes: random images and labels in the real files' IDX format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """`array` as a gzipped IDX file of unsigned bytes, as Fashion-MNIST ships."""
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(folder: Path, train: int, test: int) -> Path:
    """The four files in `folder`: `train` and `test` random 28x28 images with random labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", train), ("t10k", test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder
