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
A K whose pack would not end within --seconds is timed on a tenth (or a
twentieth) of the training images and its time scaled up to match (marked as an
estimate), or left out if even that would not end in time, saying so. Prints
one table; with --out, writes it there too (markdown), after each K.
--profile K and --cudnn-compare K look into one pack of K instead (see each);
--concurrent K times packs of K in several processes on the card at once. These
three never build the full training set: they train on a part of it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import queue
import time

import torch
from gpu_sweep import synthetic_cifar
from torch.autograd import DeviceType

from nos.tasks.base import Splits, Task
from nos.tasks.networks import paper_convnet
from nos.tasks.objectives import Accuracy
from nos.tasks.packed import evaluate_rules

# Shapes a search meets (moments, signs, weight decay, noise, a schedule); scaled by a constant
# per round so that every rule of a pack is distinct, as a search's are.
BASES = ("g", "sign(g)", "m", "sign(m)", "g * exp(sign(g) * sign(m))", "clip(g, 1e-3) + 1e-3 * w",
         "drop(g, 0.1) * exp(1e-3 * w)", "m * ld")


SCALE = 10   # a K too slow for the time left is timed on 1/SCALE of the training set (the diagnostics train on it)
# ... or on 1/20, if a tenth would not end in time either: the largest K that fits is the last one timed,
# when the least time is left, and a rougher figure for it beats none.
SCALES = (SCALE, 2 * SCALE)
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
                gc.collect()   # a failed pack's parameters, gradients and moments are held in a reference cycle
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
    if args.profile or args.cudnn_compare or args.concurrent:
        diagnose(args, device, name)
        return
    task = cifar_task(device, args.train_size, args.val_size, args.batch, args.epochs, args.channels_last)
    head = describe(task, name)
    print(head, flush=True)
    warm_up(device, args.batch)
    rows: list[tuple] = []
    notes: list[str] = []

    def left() -> float:
        return args.seconds - (time.perf_counter() - began)

    def measure(k: int) -> None:
        scale = 1
        if rows:   # a pack's time grows at most about linearly in K
            expected = rows[-1][1] * k / rows[-1][0]
            if expected > left():
                # The same protocol on a part of the images, its time scaled up to match.
                scale = next((s for s in SCALES if expected / s <= left()), 0)
                if not scale:
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


def describe(task: Task, name: str) -> str:
    return (f"packed evaluation, torch {torch.__version__} on {name}: synthetic CIFAR-10 {task.splits.sizes}"
            f"{', channels last' if task.channels_last else ''}, "
            f"batch {task.batch_size}, {len(task.lrs)} rates x {task.sweep_epochs} epoch then {task.epochs}")


def warm_up(device: torch.device, batch: int) -> None:
    run_pack(cifar_task(device, batch * 2, batch, batch, 1), 2)   # kernels, cuDNN's plans, the allocator


def diagnose(args: argparse.Namespace, device: torch.device, name: str) -> None:
    """--profile, --concurrent or --cudnn-compare, on a part of the training images."""
    train = max(args.train_size // SCALE, args.batch * 2)
    if args.profile:
        # A full pack's trace holds about a million events, which take minutes to parse; the shares of host
        # and device are what is asked, and a pack of 8 batches with 2 final epochs has them in a tenth as many.
        train = min(train, args.batch * 8)
        val = max(args.batch, args.val_size * train // args.train_size)   # validation's share as in the protocol
        small = cifar_task(device, train, val, args.batch, min(args.epochs, 2), args.channels_last)
    else:
        small = cifar_task(device, train, args.val_size, args.batch, args.epochs, args.channels_last)
    print(describe(small, name), flush=True)
    warm_up(device, args.batch)
    if args.profile:
        profile(small, args.profile)
    elif args.concurrent:
        concurrent(small, args.concurrent, args.processes, vars(args) | {"train_size": train})
    else:
        def part(size: int, channels_last: bool) -> Task:
            return cifar_task(device, size, args.val_size, args.batch, args.epochs, channels_last)
        # The untimed pack before each mode's timed one needs only to meet its shapes: the same batch and
        # validation set, and 2 batches of training images (every step takes a full batch).
        compare_cudnn(small, part(train, True), part(args.batch * 2, args.channels_last),
                      part(args.batch * 2, True), args.cudnn_compare)


# The host's waits for the device: a synchronisation, or a copy to or from it (a copy to the host waits for
# every kernel queued before it). Their time is the host's but not its work.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
         "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpy")


def split_times(events) -> tuple[float, float, float]:
    """(device busy, host work, host waiting for the device), in seconds, from key_averages()' rows.

    A kernel is a device row of its own, and its time is also the self device time of the op that
    launched it: summed over all rows it would count twice. Device rows alone are summed, as the
    profiler's own table does for its total. The host's waits are CUDA runtime rows of their own (the
    op that waits keeps only its own time): counted with the host's work, a pack bound by the card
    would look bound by the host.
    """
    def on_device(e) -> bool:
        if e.device_type == DeviceType.CPU:
            return bool(getattr(e, "is_legacy", False))   # the legacy profiler's kernels sit in CPU rows
        return not getattr(e, "is_user_annotation", False)

    device = sum(e.self_device_time_total for e in events if on_device(e))
    host = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU)
    waiting = sum(e.self_cpu_time_total for e in events if e.device_type == DeviceType.CPU and e.key.startswith(WAITS))
    return device / 1e6, (host - waiting) / 1e6, waiting / 1e6


def profile(task: Task, k: int) -> None:
    """One pack of K under torch.profiler: the busiest ops by device and by host time, and their totals.

    A pack whose device is busy for most of its wall time is bound by the card's kernels; one whose
    device idles while the host works (Python, dispatch, launches) is bound by the K optimizers'
    launches. The host's waits for the device are counted apart from its work.
    """
    from torch.profiler import ProfilerActivity, profile as profiler

    cuda = task.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    head = f"profile of K={k} on {task.splits.sizes['train']} training images"
    gc.collect()
    with profiler(activities=activities) as prof:
        start = time.perf_counter()
        run_pack(task, k)
        wall = time.perf_counter() - start
        # Before the trace's parse, which may take long: a step cut short during it keeps the wall time.
        print(f"{head}: wall {wall:.1f} s (profiled)", flush=True)
        # The parse makes an object per event, some 10^5: collections among them would make it several times slower.
        gc.disable()
        start = time.perf_counter()   # the profiler may parse the trace as it stops
    try:
        events = prof.key_averages()
        parse = time.perf_counter() - start
    finally:
        gc.enable()
    for sort in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        print(events.table(sort_by=sort, row_limit=15, max_name_column_width=50), flush=True)
    busy, work, waiting = split_times(events)
    device = (f"device busy {busy:.1f} s ({busy / wall:.0%} of the wall time), " if cuda
              else "device rows: none (not CUDA), ")
    print(f"{head}: {device}host in ops {work:.1f} s, host waiting for the device (syncs, copies) {waiting:.1f} s, "
          f"{sum(e.count for e in events if e.key.startswith('aten::'))} aten calls "
          f"(the trace parsed in {parse:.0f} s)", flush=True)


def concurrent(task: Task, k: int, processes: int, args: dict) -> None:
    """A pack of K alone, then one in each of `processes` processes at once (this one and others, started together).

    One worker process per card is nos's default. Where a pack's own step leaves the card idle while
    the host launches its kernels (Python, dispatch), a second process's kernels can run meanwhile:
    the card's evaluations per hour then grow with the processes; where the card is busy, they do not.
    """
    print(f"packs of K={k} on {task.splits.sizes['train']} training images, in several processes on one device:",
          flush=True)
    spawn = multiprocessing.get_context("spawn")   # a CUDA process cannot fork
    ready, go, done = spawn.Queue(), spawn.Event(), spawn.Queue()
    others = [spawn.Process(target=concurrent_pack, args=(args, k, ready, go, done)) for _ in range(processes - 1)]
    # Started first: they start up and train their untimed packs while this one trains its own.
    for other in others:
        other.start()
    try:
        run_pack(task, k)   # untimed, as the other processes' first
        try:
            gather(ready, others, k, "before its untimed pack ended", 300)   # from here they wait: this one is alone
            failed = None
        except SystemExit as error:   # this process's own pack is still worth its row
            failed = error
            stop(others)
        alone, _, _ = run_pack(task, k)
        print("| processes | seconds (all packs done) | evaluations/hour | / one process |")
        print("|---|---|---|---|")
        print(f"| 1 | {alone:.1f} | {3600 * k / alone:.0f} | 1.00x |", flush=True)
        if failed:
            raise failed
        go.set()
        start = time.perf_counter()
        run_pack(task, k)
        seconds = [time.perf_counter() - start, *gather(done, others, k, "before its timed pack ended", 600)]
    finally:
        stop(others)
    wall = max(seconds)
    rate = 3600 * k * processes / wall
    print(f"| {processes} | {wall:.1f} | {rate:.0f} | {rate / (3600 * k / alone):.2f}x |", flush=True)


def gather(answers, others: list, k: int, when: str, seconds: float) -> list:
    """One answer from each of `others`, watching them meanwhile: one that dies (an import, memory, cuDNN)
    ends the wait at once, with one line, rather than when the step's time limit kills this process."""
    got, end = [], time.monotonic() + seconds
    while len(got) < len(others):
        try:
            got.append(answers.get(timeout=1))
        except queue.Empty:
            dead = [other.exitcode for other in others if other.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"packs of K={k} in {len(others) + 1} processes: not timed, another process ended "
                                 f"(exit code {dead[0]}) {when}; its traceback is above") from None
            if all(other.exitcode == 0 for other in others) or time.monotonic() > end:
                raise SystemExit(f"packs of K={k} in {len(others) + 1} processes: not timed, another process gave "
                                 f"no answer {when}") from None
    return got


def stop(others: list) -> None:
    for other in others:
        if other.is_alive():
            other.terminate()
        other.join(timeout=10)


def concurrent_pack(args: dict, k: int, ready, go, done) -> None:
    """One of --concurrent's other processes: the same task, an untimed pack, then the timed one when told."""
    device = torch.device(args["device"])
    task = cifar_task(device, args["train_size"], args["val_size"], args["batch"], args["epochs"],
                      args["channels_last"])
    run_pack(task, k)
    ready.put(os.getpid())
    if not go.wait(timeout=300):   # the first process has gone
        return
    start = time.perf_counter()
    run_pack(task, k)
    done.put(time.perf_counter() - start)


# cuDNN's (deterministic, benchmark, allow_tf32) flags, and whether the images are channels-last: nos
# evaluates under the first (nos.tasks.training.deterministic), with the task's own memory format. TF32
# (cuDNN's default) rounds convolutions to 10-bit mantissas, and a pack's grouped convolutions change shape
# with its size, so a reward can depend on which rules shared the pack; "no TF32" prices full float32.
# The rows are printed as they are measured, so a step cut short loses the last: after nos's own, first
# the memory format and cuDNN's pick, which could change nos's defaults.
CUDNN_MODES = {"deterministic": (True, False, True), "deterministic, channels last": (True, False, True),
               "deterministic, timed pick": (True, True, True), "free": (False, True, True),
               "deterministic, no TF32": (True, False, False)}


def compare_cudnn(task: Task, nhwc: Task, warm: Task, warm_nhwc: Task, k: int) -> None:
    """A pack of K under each of CUDNN_MODES in turn; seconds and rewards against nos's own setting.

    cuDNN's heuristic may pick a slow algorithm for the grouped convolutions a stack becomes, and
    deterministic ones may be slower than the rest; a timed pick (cudnn.benchmark) may differ from run
    to run, and so may the results of non-deterministic kernels, which is why nos uses neither. The
    channels-last row trains `nhwc`, the same task with channels-last images (cuDNN's NHWC kernels).
    Each mode first trains one untimed pack on `warm` (or `warm_nhwc`), the same shapes on fewer
    images (a timed pick times its candidates at the first call of each shape); each row is printed as
    it is measured, so a run cut short keeps what it measured.
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
          f"each timed after an untimed pack on {warm.splits.sizes['train']} of them:")
    print("| cuDNN | seconds per pack | / deterministic | largest reward difference |")
    print("|---|---|---|---|", flush=True)
    base, first = 0.0, []
    original = packed.deterministic
    try:
        for mode in CUDNN_MODES:   # "deterministic", nos's own, first: the others are compared with it
            packed.deterministic = under(mode)
            trained, warmed = (nhwc, warm_nhwc) if mode.endswith("channels last") else (task, warm)
            evaluate_rules(rules(k), warmed, seed=0)
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
