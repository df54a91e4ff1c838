"""One driver per run, and how a driver ends: SIGTERM, `kill -9`, `nos stop` of a run whose driver is gone.

Real `nos enqueue` processes with real local workers; each test kills or signals the driver alone, as a
user's `kill PID` does, and checks that no worker outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from typing import Iterator

import pytest

from nos.store import open_store
from nos.store.models import Run

from helpers.driver import finished_count, has_run, nos, run_rows, start_nos, wait_for

# Every test here starts a real driver with its worker processes.
pytestmark = pytest.mark.slow


def long_run(url: str, toml: str) -> tuple[str, ...]:
    # Every rule trained, in 100 batches: the run lasts long enough to be signalled mid-run even when a
    # loaded machine takes seconds to start the second `nos` process.
    return ("enqueue", "--config", toml, "--db", url, "--budget", "400", "--train-size", "1200", "--no-probe")


def group(pgid: int) -> set[int]:
    """Live processes of a process group (zombies, which have exited, left out)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.add(int(entry))
    return found


@contextlib.contextmanager
def _group_killed_after(driver: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The block's driver; whatever of its process group (it and its local workers) still lives is killed after."""
    try:
        yield driver
    finally:
        if group(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)


def run_row(url: str) -> tuple:
    store = open_store(url)
    with store.reading() as session:
        run = session.get(Run, 1)
        row = (run.status, run.driver, run.error)
    store.dispose()
    return row


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'nos.db'}"


def test_a_second_driver_is_refused_and_sigterm_stops_the_first_cleanly(url, tiny_toml):
    driver = start_nos(*long_run(url, tiny_toml))
    try:
        wait_for(lambda: has_run(url) and finished_count(url, 1) >= 2)
        workers = group(driver.pid) - {driver.pid}
        assert workers   # the local worker processes
        first = f"{socket.gethostname()}:{driver.pid}"
        assert run_row(url) == ("running", first, None)

        second = nos("resume", "1", "--db", url)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"Error: run 1 is already driven by {first} (lease renewed" in second.stderr
        assert "`nos stop 1`" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert run_row(url) == ("running", first, None)   # the live run is neither failed nor taken over

        driver.send_signal(signal.SIGTERM)   # `kill PID`: the driver alone
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 3, out   # stopped, not completed: a script's `&&` must not go on
    assert "run 1 stopped; continue it with:  nos resume 1" in out
    assert run_row(url) == ("stopped", None, None)
    assert not any(e.status == "running" for e in run_rows(url, 1))   # every claim given back
    assert not group(driver.pid) & workers


def test_workers_die_with_a_killed_driver_and_stop_marks_the_driverless_run_stopped(url, tiny_toml):
    """And the resume takes back their claims at once, uncounted: they were lost to the driver, not the rules."""
    driver = start_nos(*long_run(url, tiny_toml))
    try:
        wait_for(lambda: has_run(url) and finished_count(url, 1) >= 2
                 and any(e.status == "running" for e in run_rows(url, 1)))
        workers = group(driver.pid) - {driver.pid}
        assert workers
        os.kill(driver.pid, signal.SIGKILL)   # the driver alone: nothing signals its workers
        driver.wait()
        wait_for(lambda: not group(driver.pid) & workers, timeout=30)
    finally:
        if group(driver.pid):   # whatever the test left alive
            os.killpg(driver.pid, signal.SIGKILL)
    assert run_row(url)[0] == "running"
    lost = {e.id for e in run_rows(url, 1) if e.status == "running"}
    assert lost and all(e.attempts == 1 for e in run_rows(url, 1) if e.id in lost)

    stop = nos("stop", "1", "--db", url)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "run 1 had no live driver: marked stopped; continue it with:  nos resume 1"
    assert run_row(url) == ("stopped", None, None)

    again = nos("stop", "1", "--db", url)
    assert again.returncode == 2
    assert "run 1 is stopped, not running" in again.stderr
    assert run_row(url) == ("stopped", None, None)

    resumed = start_nos("resume", "1", "--db", url)
    try:
        wait_for(lambda: all(e.status in ("done", "diverged", "failed") for e in run_rows(url, 1) if e.id in lost))
        resumed.send_signal(signal.SIGTERM)
        out, _ = resumed.communicate(timeout=120)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    assert resumed.returncode == 3, out   # stopped by the TERM above
    # Claimed once by a worker that died with the first driver (given back uncounted), once after the resume.
    assert [(e.status in ("done", "diverged"), e.attempts) for e in run_rows(url, 1) if e.id in lost] \
        == [(True, 1)] * len(lost)


def _workers_of(driver_pid: int) -> list[int]:
    with open(f"/proc/{driver_pid}/task/{driver_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    found = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if "spawn_main" in f.read():   # not the resource tracker
                    found.append(pid)
        except OSError:
            pass
    return found


def _waiting_for_work(pid: int) -> bool:
    """Blocked in read(2): an idle worker waits on its pipe (a busy one trains, on the CPU)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == "0"
    except (OSError, IndexError):
        return False


def test_a_worker_killed_while_it_waits_for_work_is_replaced_and_the_run_finishes(url, tiny_toml):
    """Fed from one shared queue, a worker killed in its get() held the queue's lock for good: no worker got
    work again, and the run hung. Steps of 4 on 2 workers leave them idle while the driver learns."""
    driver = start_nos("enqueue", "--config", tiny_toml, "--db", url, "--synchronous")
    with _group_killed_after(driver):
        idle = wait_for(lambda: has_run(url) and finished_count(url, 1) >= 1
                        and next((pid for pid in _workers_of(driver.pid) if _waiting_for_work(pid)), None),
                        timeout=120, every=0.01)
        os.kill(idle, signal.SIGKILL)
        out, _ = driver.communicate(timeout=180)
    assert driver.returncode == 0, out
    assert run_row(url)[0] == "completed"
    assert finished_count(url, 1) == 12


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_as_the_run_is_created_stops_it_cleanly(url, tiny_toml, signum):
    """Raised as KeyboardInterrupt the moment the run row existed, before the driver's loop, a signal
    left the run `running` with a dead driver (exit 1, or killed by the signal)."""
    driver = start_nos(*long_run(url, tiny_toml))
    with _group_killed_after(driver):
        wait_for(lambda: has_run(url), timeout=120, every=0.001)
        driver.send_signal(signum)
        out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 3, out
    assert "run 1 stopped; continue it with:  nos resume 1" in out
    assert run_row(url) == ("stopped", None, None)
    assert not any(e.status == "running" for e in run_rows(url, 1))


def test_a_signal_as_the_run_completes_leaves_it_completed(url, tiny_toml):
    """It reported `stopped` (exit 3) for a completed run, whose `nos resume` then failed."""
    driver = start_nos("enqueue", "--config", tiny_toml, "--db", url)
    with _group_killed_after(driver):
        wait_for(lambda: has_run(url) and run_row(url)[0] == "completed", timeout=180, every=0.001)
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 0, out
    assert "run 1 completed" in out


def test_a_driver_started_under_nohup_is_not_stopped_by_sighup(url, tiny_toml):
    """`nohup nos enqueue ... &`: the driver put its stop handler over the SIGHUP nohup ignores, and a closed
    terminal stopped the run nohup was asked to keep going."""
    import sys

    def as_nohup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    driver = subprocess.Popen([sys.executable, "-m", "nos.cli.main", "enqueue", "--config", tiny_toml, "--db", url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                              preexec_fn=as_nohup)
    with _group_killed_after(driver):
        wait_for(lambda: has_run(url) and finished_count(url, 1) >= 1, timeout=180, every=0.01)
        os.killpg(driver.pid, signal.SIGHUP)   # what a closed terminal sends its session
        out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out
    assert run_row(url)[0] == "completed"


def test_a_reader_that_goes_away_leaves_the_search_going(url, tiny_toml):
    """`nos enqueue ... | head -1` on a new database: the pipe broke at the RUN_ID line, after the run was made,
    and rich's exit on a broken pipe left the run `running` with a dead driver (exit 1, no word)."""
    driver = start_nos("enqueue", "--config", tiny_toml, "--db", url)
    with _group_killed_after(driver):
        assert driver.stdout.readline().startswith("created database")
        driver.stdout.close()   # the reader is gone: every later write meets a broken pipe
        assert driver.wait(timeout=300) == 0
    assert run_row(url) == ("completed", None, None)


def test_signals_after_the_run_ended_leave_its_exit_status(url, tiny_toml):
    """Python resets signal handlers as it shuts down, then takes a second or so over torch's modules: a Ctrl-C
    then turned a completed run's exit 0 into 130."""
    import time

    driver = start_nos("enqueue", "--config", tiny_toml, "--db", url)
    with _group_killed_after(driver):
        for line in driver.stdout:
            if line.startswith("run 1 completed"):
                break
        while driver.poll() is None:   # Ctrl-C after Ctrl-C until it has exited
            os.killpg(driver.pid, signal.SIGINT)
            time.sleep(0.02)
    assert driver.returncode == 0
    assert run_row(url)[0] == "completed"


STARTS_WORKERS_THEN_CTRL_C = """
import os, signal, sys, time
from nos.executors import LocalExecutor
signal.signal(signal.SIGINT, lambda *_: None)   # the driver's own handler: it decides what stops
executor = LocalExecutor(sys.argv[1], workers=2)
os.killpg(0, signal.SIGINT)                     # Ctrl-C while the workers' interpreters start
deadline = time.monotonic() + 120
while not all(w.started.is_set() for w in executor._workers) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(1)
print("alive", sum(w.process.is_alive() for w in executor._workers))
executor.close()
"""


def test_a_ctrl_c_as_local_workers_start_reaches_none_of_them(url):
    """Workers ignored Ctrl-C only once their main function ran, after their interpreter had started and
    re-imported the caller's main module: a Ctrl-C in that second printed a traceback from each."""
    import sys

    from nos.store import resolve_url, upgrade

    upgrade(resolve_url(url))
    done = subprocess.run([sys.executable, "-c", STARTS_WORKERS_THEN_CTRL_C, url], capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert "KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip() == "alive 2"
