"""Datasets as whole tensors: read once from disk, never through a per-sample loader.

Every loader returns `(train_x, train_y, test_x, test_y)` as CPU tensors,
images float32 in [0, 1] shaped (N, C, H, W), labels int64. Splitting off
validation, subsampling and moving to the device are the task's business.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]

# Debian's dataset-fashion-mnist package puts the four gzipped idx files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 30


class DataUnavailable(RuntimeError):
    """A data set's files are not on disk and could not be downloaded."""


def data_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Where to look, in order: the explicit folder, else $NOS_DATA_DIR."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get("NOS_DATA_DIR")
    return [Path(env).expanduser()] if env else []


def download_root(data_dir: str | os.PathLike | None) -> Path:
    found = data_dirs(data_dir)
    return found[0] if found else Path.home() / ".cache" / "nos" / "data"


# -- scikit-learn digits -------------------------------------------------------
def load_digits_arrays() -> tuple[Tensor, Tensor]:
    """All 1,797 of scikit-learn's bundled 8x8 digits: x (N, 64) in [0, 1], y (N,)."""
    data = _bundled_digits()
    x = torch.from_numpy(data[:, :-1].astype(np.float32)) / 16.0
    return x, torch.from_numpy(data[:, -1].astype(np.int64))


def _bundled_digits() -> np.ndarray:
    """scikit-learn's digits.csv.gz as load_digits reads it: one row per image, 64 pixels then the label.

    Read from the file, as load_digits itself does: importing sklearn.datasets takes over a second,
    every worker process and every `nos eval` paid it, and the digits need none of it.
    """
    spec = importlib.util.find_spec("sklearn")   # finds the package without importing it
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():   # another layout: let scikit-learn find its own file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.column_stack([bunch.data, bunch.target])
    with gzip.open(path, "rt") as file:
        return np.loadtxt(file, delimiter=",")


# -- Fashion-MNIST -------------------------------------------------------------
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path) -> Tensor:
    """An idx file (optionally gzipped) as a uint8 tensor of its declared shape."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataUnavailable(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def _find_fashion_files(folder: Path) -> dict[str, Path] | None:
    # A plain folder of idx files (Debian, by hand) or torchvision's FashionMNIST/raw layout.
    for base in (folder, folder / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in _FASHION_FILES.items():
            candidates = [base / f"{stem}.gz", base / stem]
            found[key] = next((c for c in candidates if c.is_file()), None)
        if all(found.values()):
            return found
    return None


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Arrays:
    """Fashion-MNIST from `data_dir`, $NOS_DATA_DIR, Debian's package, else torchvision's download."""
    folders = data_dirs(data_dir) + ([] if data_dir is not None else [DEBIAN_FASHION_MNIST])
    for folder in folders:
        files = _find_fashion_files(folder)
        if files:
            images = {k: _read_idx(p) for k, p in files.items()}
            return (_as_images(images["train_x"]), images["train_y"].long(),
                    _as_images(images["test_x"]), images["test_y"].long())
    root = download_root(data_dir)
    _download("Fashion-MNIST", "FashionMNIST", root, folders, download and _may_download_into(root, data_dir))
    return load_fashion_mnist(root, download=False)


def _as_images(pixels: Tensor) -> Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(1)
    else:
        pixels = pixels.permute(0, 3, 1, 2)
    return pixels.float().div_(255.0).contiguous()


# -- CIFAR-10 ------------------------------------------------------------------
_CIFAR_FOLDER = "cifar-10-batches-py"


def _find_cifar_folder(folder: Path) -> Path | None:
    for base in (folder / _CIFAR_FOLDER, folder):
        if (base / "data_batch_1").is_file() and (base / "test_batch").is_file():
            return base
    return None


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists, numbers and strings, and nothing else.

    CIFAR-10's python version is a set of pickles. pickle.load would run any
    callable a crafted file names (os.system, say); this one refuses every
    global but numpy's array constructors, so a file can hold data, never code.
    """

    def find_class(self, module: str, name: str):
        allowed = _ARRAY_GLOBALS.get((module.replace("numpy._core", "numpy.core"), name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, and only numpy arrays are read")
        return allowed


try:
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:   # numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer
_ARRAY_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,   # how protocol 2 writes Python 3 bytes: text to bytes, no code
}


def _read_cifar_batches(paths: list[Path]) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for path in paths:
        try:
            with path.open("rb") as f:
                batch = _ArraysOnly(f, encoding="latin1").load()
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise DataUnavailable(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(np.concatenate(xs)).float().div_(255.0), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir: str | os.PathLike | None = None, download: bool = True) -> Arrays:
    """CIFAR-10 (python version) from `data_dir`, $NOS_DATA_DIR, else torchvision's download."""
    folders = data_dirs(data_dir)
    for folder in folders:
        base = _find_cifar_folder(folder)
        if base:
            train_x, train_y = _read_cifar_batches([base / f"data_batch_{i}" for i in range(1, 6)])
            test_x, test_y = _read_cifar_batches([base / "test_batch"])
            return train_x, train_y, test_x, test_y
    root = download_root(data_dir)
    _download("CIFAR-10", "CIFAR10", root, folders, download and _may_download_into(root, data_dir))
    return load_cifar10(root, download=False)


# -- download ------------------------------------------------------------------
_WHERE = {
    "Fashion-MNIST": "the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (gzipped or not) in DIR "
                     "(or `apt-get install dataset-fashion-mnist`)",
    "CIFAR-10": "the python version's folder cifar-10-batches-py/ (data_batch_1..5, test_batch), "
                "unpacked from cifar-10-python.tar.gz, in DIR",
}


def _may_download_into(root: Path, data_dir: str | os.PathLike | None) -> bool:
    """False when the folder was named (--data-dir, $NOS_DATA_DIR) but is not there: a typo, not a cache."""
    return not data_dirs(data_dir) or root.is_dir()


def _folders(root: Path) -> set[Path]:
    """The folders torchvision may make in `root` (ROOT/Class/raw): two levels down."""
    if not root.is_dir():
        return set()
    return {p for pattern in ("*", "*/*") for p in root.glob(pattern) if p.is_dir()}


def _download(name: str, torchvision_class: str, root: Path, looked_in: list[Path], download: bool) -> None:
    """torchvision's download into `root`; a DataUnavailable saying where files go if it fails."""
    places = ", ".join(str(p) for p in looked_in) or "nowhere (no --data-dir, no $NOS_DATA_DIR)"
    where = f"Put {_WHERE[name]}, then pass --data-dir DIR or set NOS_DATA_DIR=DIR."
    if not download:
        missing = [p for p in looked_in if not p.is_dir()]
        why = (f"the folder {missing[0]} does not exist" if missing and missing[0] == root
               else "downloading is off")
        raise DataUnavailable(f"{name} is not on disk (looked in: {places}) and {why}.\n{where}")
    import torchvision

    before = _folders(root)

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)   # an unreachable mirror fails, it does not hang
    try:
        getattr(torchvision.datasets, torchvision_class)(str(root), download=True)
    except Exception as exc:   # URLError, timeouts, bad checksums: all mean "no files"
        for folder in sorted(_folders(root) - before, key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):   # leave no empty folders behind
                folder.rmdir()
        raise DataUnavailable(
            f"{name} is not on disk and could not be downloaded into {root} ({type(exc).__name__}: {exc}).\n"
            f"Looked in: {places}.\n{where}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
