"""How soon a SIGKILLed Celery worker's evaluation is taken up again, under the default stale limit.

    python benchmarks/requeue_latency.py [--kills 2] [--broker redis://127.0.0.1:6379/9] [--hogs 2]

Two `nos worker` processes train a Fashion-MNIST search whose evaluations
last tens of seconds, with SearchConfig's default heartbeat_every and stale_after. Each
round kills one worker's whole process group (master and pool child) in the
middle of an evaluation, then times, from the kill, until the driver puts the
evaluation back in the queue and until another worker claims it (attempt 2).
A fresh worker replaces the dead one. `--hogs N` adds N busy loops so
that the live worker's heartbeats fight for the CPU too; its evaluations
must never be retaken (attempts stay 1), which the script checks at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from sqlalchemy import select

from nos.config import SearchConfig
from nos.store import open_store, resolve_url, upgrade
from nos.store.models import Evaluation

# Fashion-MNIST (Debian's fashion-mnist package, or --data-dir): evaluations of a minute or so on one core.
CONFIG = """
task = "fashion-mnist"
budget = {budget}
batch_size = 4
depth = 2
searcher = "evolution"
probe = false

[task_options]
train_size = 10000
lrs = [0.001, 0.01, 0.1]
epochs = 3
"""


def nos(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nos.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, **kwargs)


def rows(store) -> list[Evaluation]:
    with store.reading() as session:
        return list(session.execute(select(Evaluation).order_by(Evaluation.id)).scalars())


def group_pids(pgid: int) -> set[int]:
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[2]) == pgid:
                    found.add(int(entry))
        except OSError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--hogs", type=int, default=0)
    args = parser.parse_args()
    defaults = SearchConfig()
    print(f"defaults: heartbeat_every {defaults.heartbeat_every:g} s, stale_after {defaults.stale_after:g} s",
          flush=True)

    folder = tempfile.mkdtemp(prefix="nos-requeue-")
    url = f"sqlite:///{folder}/nos.db"
    upgrade(resolve_url(url))
    toml = f"{folder}/run.toml"
    with open(toml, "w") as out:
        out.write(CONFIG.format(budget=4 * (args.kills + 2)))
    subprocess.run(["redis-cli", "-u", args.broker, "flushdb"], check=True, capture_output=True)
    workers: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        workers[name] = nos("worker", "--db", url, "--broker", args.broker, "--queues", "cpu",
                            "--concurrency", "1", "--name", f"{name}@bench")

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    start("w0")
    start("w1")
    driver = nos("enqueue", "--config", toml, "--db", url, "--broker", args.broker)
    store = None
    try:
        while store is None:
            try:
                store = open_store(url)
                rows(store)
            except Exception:
                store = None
                time.sleep(0.5)
        killed_ids = []
        for round_ in range(args.kills):
            victim = f"w{round_ % 2}"
            pids = group_pids(workers[victim].pid)
            while True:   # one of the victim's evaluations, a few heartbeats in
                running = [e for e in rows(store) if e.status == "running" and e.attempts == 1
                           and int(e.worker.rsplit(":", 1)[1]) in pids]
                if running and time.time() - running[0].claimed_at.timestamp() > 2 * defaults.heartbeat_every:
                    break
                pids |= group_pids(workers[victim].pid)
                time.sleep(0.1)
            evaluation_id = running[0].id
            killed_ids.append(evaluation_id)
            os.killpg(workers[victim].pid, signal.SIGKILL)
            killed = time.monotonic()
            workers[victim].wait()
            start(victim)
            requeued = None
            while True:
                row = next(e for e in rows(store) if e.id == evaluation_id)
                if requeued is None and (row.status == "queued" or row.attempts > 1):
                    requeued = time.monotonic() - killed
                if row.attempts > 1:
                    break
                time.sleep(0.1)
            print(f"kill {round_ + 1}: evaluation {evaluation_id} requeued after {requeued:.1f} s, "
                  f"claimed by another worker after {time.monotonic() - killed:.1f} s", flush=True)
        subprocess.run([sys.executable, "-m", "nos.cli.main", "stop", "1", "--db", url], capture_output=True)
        driver.wait(timeout=600)
        retaken = sorted(e.id for e in rows(store) if e.attempts > 1)
        print(f"evaluations retaken: {retaken}; killed: {sorted(killed_ids)}; "
              f"no live worker's retaken: {retaken == sorted(killed_ids)}")
    finally:
        for process in [driver, *workers.values()]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for hog in hogs:
            hog.kill()
            hog.wait()
        if store is not None:
            store.dispose()


if __name__ == "__main__":
    main()
