"""Packed evaluation on the paper's CIFAR-10 protocol: evaluations per hour at several pack sizes K.

    python benchmarks/gpu_pack.py                    # cuda: 45,000 / 5,000 CIFAR-shaped images, K = 1, 8, 32, largest
    python benchmarks/gpu_pack.py --device cpu --train-size 256 --val-size 64 --batch 32 \\
        --epochs 2 --packs 1,2 --max-pack 4          # a smoke run anywhere, in seconds

The protocol: the paper's convnet child, batch 128, 7 learning rates for one
epoch each (stacked), then the best rate for 5 epochs. The data is synthetic
but CIFAR-shaped (benchmarks/gpu_sweep.py) and resident on the device, so no
download is needed. For each K, `evaluate_rules` on K distinct rules trains
K x 7 sweep children as one stack, then the final runs packed; evaluations per
hour is K over the wall time of that pack. Then the largest K that fits in
memory is found by doubling on a few steps, and timed on the full protocol.
A K whose pack would not end within --seconds is timed on a tenth of the
training images and its time taken ten times (marked as an estimate), or left
out if even that would not end in time, saying so. Prints
one table; with --out, writes it there too (markdown), after each K.
--profile K and --cudnn-compare K look into one pack of K instead (see each);
--concurrent K times packs of K in several processes on the card at once.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import time

import torch
from gpu_sweep import synthetic_cifar

from nos.tasks.base import Splits, Task
from nos.tasks.networks import paper_convnet
from nos.tasks.objectives import Accuracy
from nos.tasks.packed import evaluate_rules

# Shapes a search meets (moments, signs, weight decay, noise, a schedule); scaled by a constant
# per round so that every rule of a pack is distinct, as a search's are.
BASES = ("g", "sign(g)", "m", "sign(m)", "g * exp(sign(g) * sign(m))", "clip(g, 1e-3) + 1e-3 * w",
         "drop(g, 0.1) * exp(1e-3 * w)", "m * ld")


SCALE = 10   # a K too slow for the time left is timed on 1/SCALE of the training set
TOO_BIG = (torch.cuda.OutOfMemoryError, RuntimeError)   # memory, and cuDNN's and indexing's size limits


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def rules(k: int) -> list[str]:
    return [f"{1 + (i // len(BASES)) / 100:g} * ({BASES[i % len(BASES)]})" for i in range(k)]


def cifar_task(device: torch.device, train: int, val: int, batch: int, epochs: int,
               channels_last: bool = False) -> Task:
    train_x, train_y = synthetic_cifar(train, device, 0)
    val_x, val_y = synthetic_cifar(val, device, 1)
    test_x, test_y = synthetic_cifar(val, device, 2)
    channels_last = channels_last or device.type == "cpu"
    if channels_last:
        train_x, val_x, test_x = (t.contiguous(memory_format=torch.channels_last) for t in (train_x, val_x, test_x))
    return Task("cifar10-synthetic", Splits(train_x, train_y, val_x, val_y, test_x, test_y),
                lambda: paper_convnet(3, 32), Accuracy(), batch_size=batch, sweep_epochs=1, epochs=epochs,
                device=device, channels_last=channels_last)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pack(task: Task, k: int) -> tuple[float, float, int]:
    """Seconds for a pack of K on the task, peak memory in GiB (cuda; 0 elsewhere), rules that diverged."""
    device = task.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    results = evaluate_rules(rules(k), task, seed=0)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return seconds, peak, sum(r.diverged for r in results)


def largest_fit(device: torch.device, batch: int, start: int, limit: int) -> tuple[int, str]:
    """The largest K (doubling from `start`, up to `limit`) whose pack trains a few steps, and why no larger."""
    probe = cifar_task(device, batch * 3, batch, batch, 1)
    fits, k = start, start * 2
    while k <= limit:
        try:
            run_pack(probe, k)
        except TOO_BIG as error:
            return fits, f"K={k}: {first_line(error)}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fits, k = k, k * 2
    return fits, f"the probe's limit, {limit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-size", type=int, default=45000)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5, help="final run's epochs (the sweep's: 1)")
    parser.add_argument("--packs", default="1,8,32")
    parser.add_argument("--max-pack", type=int, default=1024, help="largest K the memory probe tries")
    parser.add_argument("--seconds", type=float, default=240, help="time for the whole benchmark: a K is "
                        "timed only if its pack is expected to end within it")
    parser.add_argument("--channels-last", action="store_true", help="images and convolutions in NHWC "
                        "(always on the CPU)")
    parser.add_argument("--profile", type=int, metavar="K", help="instead: profile one pack of K on a tenth of "
                        "the training images (torch.profiler): where the host's and the device's time goes")
    parser.add_argument("--cudnn-compare", type=int, metavar="K", help="instead: time one pack of K on a tenth "
                        "of the training images under each cuDNN setting (CUDNN_MODES) in turn: what "
                        "deterministic kernels, cuDNN's heuristic pick and contiguous images cost")
    parser.add_argument("--concurrent", type=int, metavar="K", help="instead: on a tenth of the training images, "
                        "a pack of K in this process alone, then one in each of --processes processes at once: "
                        "whether the card does more work for two workers than for one")
    parser.add_argument("--processes", type=int, default=2, help="processes for --concurrent")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    began = time.perf_counter()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    task = cifar_task(device, args.train_size, args.val_size, args.batch, args.epochs, args.channels_last)
    head = (f"packed evaluation, torch {torch.__version__} on {name}: synthetic CIFAR-10 {task.splits.sizes}"
            f"{', channels last' if task.channels_last else ''}, "
            f"batch {args.batch}, {len(task.lrs)} rates x 1 epoch then {args.epochs}")
    print(head, flush=True)
    run_pack(cifar_task(device, args.batch * 2, args.batch, args.batch, 1), 2)   # warm up kernels and cuDNN
    if args.profile or args.cudnn_compare or args.concurrent:
        train = max(args.train_size // SCALE, args.batch * 2)
        small = cifar_task(device, train, args.val_size, args.batch, args.epochs, args.channels_last)
        if args.profile:
            profile(small, args.profile)
        elif args.concurrent:
            concurrent(small, args.concurrent, args.processes, vars(args) | {"train_size": train})
        else:
            nhwc = cifar_task(device, train, args.val_size, args.batch, args.epochs, channels_last=True)
            compare_cudnn(small, nhwc, args.cudnn_compare)
        return
    rows: list[tuple] = []
    notes: list[str] = []

    def left() -> float:
        return args.seconds - (time.perf_counter() - began)

    def measure(k: int) -> None:
        scale = 1
        if rows:   # a pack's time grows at most about linearly in K
            expected = rows[-1][1] * k / rows[-1][0]
            if expected > left():
                scale = SCALE   # the same protocol on a tenth of the images, its time taken ten times
                if expected / scale > left():
                    notes.append(f"K={k} not timed: about {expected:.0f} s, {left():.0f} s left of --seconds")
                    return
        small = task if scale == 1 else cifar_task(device, args.train_size // scale, args.val_size, args.batch,
                                                   args.epochs, args.channels_last)
        seconds, peak, diverged = run_pack(small, k)
        seconds *= scale
        rows.append((k, seconds, 3600 * k / seconds, peak, diverged))
        if scale > 1:
            notes.append(f"K={k} estimated: a pack on {args.train_size // scale} training images, its time x{scale} "
                         f"(the validation passes counted x{scale} too: an underestimate of evaluations/hour)")
        print(f"  K={k}: {seconds:.1f} s, {rows[-1][2]:.0f} evaluations/hour, {peak:.1f} GiB", flush=True)
        report(head, rows, notes, args.out)   # a run cut short keeps what it measured

    packs = [int(k) for k in args.packs.split(",")]
    for k in packs:
        measure(k)
    largest, stop = largest_fit(device, args.batch, max(packs), args.max_pack)
    notes.append(f"largest K that fits (probed by doubling up to {args.max_pack}): {largest}; stopped at {stop}")
    if largest > max(packs):
        try:
            measure(largest)
        except TOO_BIG as error:   # the full data may not fit where the probe did
            notes.append(f"K={largest} failed on the full protocol: {first_line(error)}")
    print("\n".join(report(head, rows, notes, args.out)))


def profile(task: Task, k: int) -> None:
    """One pack of K under torch.profiler: the busiest ops by device time, and host against device time.

    A pack whose host time (Python, dispatch, launches) nears its wall time is bound by the K optimizers'
    launches, not by the card; one whose device time does is bound by the card's kernels.
    """
    from torch.profiler import ProfilerActivity, profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if task.device.type == "cuda" else [])
    start = time.perf_counter()
    with profiler(activities=activities) as prof:
        run_pack(task, k)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events)
    host_us = sum(e.self_cpu_time_total for e in events)
    sort = "self_cuda_time_total" if task.device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=50))
    print(f"profile of K={k} on {task.splits.sizes['train']} training images: wall {wall:.1f} s (profiled), "
          f"device busy {device_us / 1e6:.1f} s, host ops {host_us / 1e6:.1f} s, "
          f"{sum(e.count for e in events if e.key.startswith('aten::'))} aten calls", flush=True)


def concurrent(task: Task, k: int, processes: int, args: dict) -> None:
    """A pack of K alone, then one in each of `processes` processes at once (this one and others, started together).

    One worker process per card is nos's default. Where a pack's own step leaves the card idle while
    the host launches its kernels (Python, dispatch), a second process's kernels can run meanwhile:
    the card's evaluations per hour then grow with the processes; where the card is busy, they do not.
    """
    run_pack(task, k)   # untimed, as the other processes' first
    alone, _, _ = run_pack(task, k)
    print(f"packs of K={k} on {task.splits.sizes['train']} training images, in several processes on one device:")
    print("| processes | seconds (all packs done) | evaluations/hour | / one process |")
    print("|---|---|---|---|")
    print(f"| 1 | {alone:.1f} | {3600 * k / alone:.0f} | 1.00x |", flush=True)
    spawn = multiprocessing.get_context("spawn")   # a CUDA process cannot fork
    ready, done = spawn.Barrier(processes), spawn.Queue()
    others = [spawn.Process(target=concurrent_pack, args=(args, k, ready, done)) for _ in range(processes - 1)]
    for other in others:
        other.start()
    ready.wait(timeout=300)   # each has built its task and trained an untimed pack
    start = time.perf_counter()
    run_pack(task, k)
    seconds = [time.perf_counter() - start] + [done.get(timeout=600) for _ in others]
    for other in others:
        other.join()
    wall = max(seconds)
    rate = 3600 * k * processes / wall
    print(f"| {processes} | {wall:.1f} | {rate:.0f} | {rate / (3600 * k / alone):.2f}x |", flush=True)


def concurrent_pack(args: dict, k: int, ready, done) -> None:
    """One of --concurrent's other processes: the same task, an untimed pack, then the timed one."""
    device = torch.device(args["device"])
    task = cifar_task(device, args["train_size"], args["val_size"], args["batch"], args["epochs"],
                      args["channels_last"])
    run_pack(task, k)
    ready.wait(timeout=300)
    start = time.perf_counter()
    run_pack(task, k)
    done.put(time.perf_counter() - start)


# cuDNN's (deterministic, benchmark, allow_tf32) flags, and whether the images are channels-last: nos
# evaluates under the first (nos.tasks.training.deterministic), with the task's own memory format. TF32
# (cuDNN's default) rounds convolutions to 10-bit mantissas, and a pack's grouped convolutions change shape
# with its size, so a reward can depend on which rules shared the pack; "no TF32" prices full float32.
CUDNN_MODES = {"deterministic": (True, False, True), "deterministic, timed pick": (True, True, True),
               "free": (False, True, True), "deterministic, no TF32": (True, False, False),
               "deterministic, channels last": (True, False, True)}


def compare_cudnn(task: Task, nhwc: Task, k: int) -> None:
    """A pack of K under each of CUDNN_MODES in turn; seconds and rewards against nos's own setting.

    cuDNN's heuristic may pick a slow algorithm for the grouped convolutions a stack becomes, and
    deterministic ones may be slower than the rest; a timed pick (cudnn.benchmark) may differ from run
    to run, and so may the results of non-deterministic kernels, which is why nos uses neither. The
    last row trains `nhwc`, the same task with channels-last images (cuDNN's NHWC kernels). Each
    mode first trains one untimed pack (a timed pick times its candidates at the first call of each
    shape); each row is printed as it is measured, so a run cut short keeps what it measured.
    """
    import nos.tasks.packed as packed

    def under(mode: str):
        @contextlib.contextmanager
        def flags(device: torch.device):
            cudnn = torch.backends.cudnn
            saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32
            cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = CUDNN_MODES[mode]
            try:
                yield
            finally:
                cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = saved
        return flags

    print(f"cuDNN settings and memory formats, a pack of K={k} on {task.splits.sizes['train']} training images, "
          "each timed after an untimed pack:")
    print("| cuDNN | seconds per pack | / deterministic | largest reward difference |")
    print("|---|---|---|---|", flush=True)
    base, first = 0.0, []
    original = packed.deterministic
    try:
        for mode in CUDNN_MODES:   # "deterministic", nos's own, first: the others are compared with it
            packed.deterministic = under(mode)
            trained = nhwc if mode.endswith("channels last") else task
            evaluate_rules(rules(k), trained, seed=0)
            sync(task.device)
            start = time.perf_counter()
            rewards = [result.reward for result in evaluate_rules(rules(k), trained, seed=0)]
            sync(task.device)
            seconds = time.perf_counter() - start
            base, first = base or seconds, first or rewards
            gap = max(abs(a - b) for a, b in zip(rewards, first))
            print(f"| {mode} | {seconds:.1f} | {seconds / base:.2f}x | {gap:.4f} |", flush=True)
    finally:
        packed.deterministic = original


def report(head: str, rows: list[tuple], notes: list[str], out: str | None) -> list[str]:
    table = [head, "", "| K | seconds per pack | evaluations/hour | peak GPU memory GiB | diverged |",
             "|---|---|---|---|---|"]
    table += [f"| {k} | {s:.1f} | {e:.0f} | {m:.2f} | {d} |" for k, s, e, m, d in rows]
    table += ["", *notes]
    if out:
        with open(out, "w") as file:
            file.write("\n".join(table) + "\n")
    return table

if __name__ == "__main__":
    main()
