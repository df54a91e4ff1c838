"""Optimizer step time on ResNet-18's parameters: nos rules against torch.optim.Adam.

    python benchmarks/optimizer_step.py [--repeats 30] [--no-compile] [--device cuda] [--host]
    python benchmarks/optimizer_step.py --compiled flat,adam-flat   # only those compiled rows

Prints milliseconds per step and ratios against Adam(foreach=True) and
Adam(fused=True), all measured in this process on the same parameters and
random gradients, and the optimizer state each rule keeps.

--host gives every tensor one element: the step then costs what the host
spends on it (Python, dispatch, guards, launches) and nothing else, which is
what bounds a step of a model of this size on a fast GPU; it measures on a
CPU what a GPU run would otherwise be needed for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import nos.optim
from nos.optim import SymbolicOptimizer


def make_params(device: str = "cpu", host: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [p.detach().to(device).requires_grad_(True) for p in torchvision.models.resnet18().parameters()]
    if host:   # the same tensors, one element each
        params = [torch.zeros((1,) * p.dim(), device=device, requires_grad=True) for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()   # a CUDA step is timed to its end, not to its launch


def time_interleaved(opts: list[torch.optim.Optimizer], repeats: int) -> list[float]:
    """Median ms per step of each optimizer (warmed up), taking turns so drift hits all alike."""
    samples: list[list[float]] = [[] for _ in opts]
    for _ in range(repeats):
        for opt, times in zip(opts, samples):
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) * 1e3 for times in samples]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--compiled", default=",".join(COMPILED), help="which torch.compile rows, by key: "
                        f"{', '.join(COMPILED)} (each compiles for tens of seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fused Adam runs on either)")
    parser.add_argument("--host", action="store_true", help="one element per tensor: the host's cost alone")
    args = parser.parse_args()
    params = make_params(args.device, args.host)
    n = sum(p.numel() for p in params)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    size = "one element each (--host)" if args.host else f"{n / 1e6:.1f}M parameters"
    print(f"ResNet-18: {len(params)} tensors, {size}, torch {torch.__version__}, {where}\n")
    eager = [
        ("torch Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)),
        ("torch Adam(fused=True)", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        ("nos adam", lambda ps: SymbolicOptimizer(ps, "adam", lr=1e-3)),
        ("nos powersign", lambda ps: SymbolicOptimizer(ps, "powersign", lr=1e-3)),
        ("nos addsign", lambda ps: SymbolicOptimizer(ps, "addsign", lr=1e-3)),
        ("nos sgd", lambda ps: SymbolicOptimizer(ps, "sgd", lr=1e-3)),
    ]
    keys = [key.strip() for key in args.compiled.split(",") if key.strip()]
    unknown = [key for key in keys if key not in COMPILED]
    if unknown:
        parser.error(f"--compiled: no row {', '.join(unknown)} (rows: {', '.join(COMPILED)})")
    compiled = [COMPILED[key] for key in keys]
    print(f"{'optimizer':33} {'ms/step':>8} {'/Adam foreach':>14} {'/Adam fused':>12} "
          f"{'first step s':>13} {'state MB':>9}", flush=True)
    # The eager rows first and printed at once: compilation is slow, and a run cut short keeps them.
    rows = measure(eager, args.device, args.repeats, args.host)
    base_foreach, base_fused = rows[0][1], rows[1][1]
    show(rows, base_foreach, base_fused)
    if compiled and not args.no_compile:
        # Timed again beside both Adams, so that their ratios are of the same moment.
        again = measure(eager[:2] + compiled, args.device, args.repeats, args.host)
        show(again[2:], again[0][1], again[1][1])


def laid_out(opt: SymbolicOptimizer, flat: bool) -> SymbolicOptimizer:
    """The compiled step over flat tensors or over every tensor, whatever nos.optim.FLAT_DEVICES says."""
    opt._flat_devices = ("cpu", *nos.optim.FLAT_DEVICES) if flat else ()
    return opt


def compiled_row(rule: str, flat: bool):
    return lambda ps: laid_out(SymbolicOptimizer(ps, rule, lr=1e-3, compile=True), flat)


GRAPHS = {"mode": "reduce-overhead"}  # CUDA graphs: one launch for the whole step

# compile=True runs flat on a GPU and per tensor (inductor's combo kernels) on a CPU; both are timed
# on either. The CUDA-graph rows take the device's own layout.
COMPILED = {
    "flat": ("nos powersign, compile flat", compiled_row("powersign", flat=True)),
    "adam-flat": ("nos adam, compile flat", compiled_row("adam", flat=True)),
    "per-tensor": ("nos powersign, compile per-tensor", compiled_row("powersign", flat=False)),
    "cudagraphs": ("nos powersign, cudagraphs", lambda ps: SymbolicOptimizer(ps, "powersign", lr=1e-3, compile=GRAPHS)),
    "adam-cudagraphs": ("nos adam, cudagraphs", lambda ps: SymbolicOptimizer(ps, "adam", lr=1e-3, compile=GRAPHS)),
}


def measure(cases: list, device: str, repeats: int, host: bool, warmup: int = 3) -> list[tuple[str, float, float, int]]:
    """(name, median ms per step, first step's seconds, state bytes) of each case that builds and steps."""
    built = []
    for name, make in cases:
        opt = make(make_params(device, host))   # each its own copy, so none slows another's memory
        start = time.perf_counter()
        try:
            opt.step()   # first step: state allocation, and compilation where asked
            sync()
            first = time.perf_counter() - start
            # The warm-up steps too: a recompile (a guard that fails on a later step) or a CUDA graph's
            # recording comes in the next steps, and its failure must cost this row only.
            for _ in range(warmup):
                opt.step()
            sync()
        except Exception as error:   # a compiler that fails must not cost the other rows
            print(f"{name:33} failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
            continue
        built.append((name, opt, first))
    times = time_interleaved([opt for _, opt, _ in built], repeats)
    return [(name, ms, first, state_bytes(opt)) for (name, opt, first), ms in zip(built, times)]


def show(rows: list[tuple[str, float, float, int]], base_foreach: float, base_fused: float) -> None:
    for name, ms, first, nbytes in rows:
        print(f"{name:33} {ms:8.2f} {ms / base_foreach:14.2f} {ms / base_fused:12.2f} "
              f"{first:13.1f} {nbytes / 2**20:9.1f}", flush=True)


if __name__ == "__main__":
    main()
