"""The devices children train on: named right, and present where they are used.

`nos enqueue` checks a run's device before writing anything (only its name
when Celery workers elsewhere train it); a worker checks it again before it
claims an evaluation, and refuses one it cannot train rather than fail it.
"""

from __future__ import annotations

import functools

import torch

KINDS = ("cpu", "cuda", "mps")
ACCEPTED = "cpu, cuda, cuda:N or mps"


class DeviceError(ValueError):
    """A device that is misnamed or not present here: the message says which, in one line."""


def parse_device(name: str) -> torch.device:
    """`name` as a torch device of a kind nos trains on (it need not be present here)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in KINDS:
        raise DeviceError(f"unknown device {name!r}: expected {ACCEPTED}")
    return device


def usable_device(name: str) -> torch.device:
    """`name` as a torch device present on this machine; DeviceError if it is misnamed or absent."""
    problem = device_problem(name)
    if problem:
        raise DeviceError(problem)
    return torch.device(name)


@functools.lru_cache(maxsize=None)   # hardware does not come and go within a process
def device_problem(name: str) -> str | None:
    """Why this machine cannot train on `name`, or None when it can."""
    try:
        device = parse_device(name)
    except DeviceError as exc:
        return str(exc)
    if device.type == "cuda":
        # device_count asks NVML where it can; is_available would initialise CUDA, and a Celery worker
        # that forks its pool after that could not use the GPU in any of them.
        count = torch.cuda.device_count()
        if count == 0:
            return f"device {name!r} asked for, but torch sees no CUDA device here"
        if device.index is not None and device.index >= count:
            present = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            return (f"device {name!r} asked for, but torch sees {count} CUDA device{'s' if count > 1 else ''} "
                    f"here ({present})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"device {name!r} asked for, but torch sees no MPS device here"
    return None
