"""Real `nos worker` (Celery) processes for the tests, each in a process group of its own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile


class Workers:
    """`nos worker` processes, each in its own process group so a test can kill one whole.

    `env`: the workers' environment (default: the tests'), e.g. a PYTHONPATH that finds a task file.
    """

    def __init__(self, db_url: str, broker_url: str, env: dict[str, str] | None = None):
        self.db_url, self.broker_url, self.env, self.processes = db_url, broker_url, env, {}
        self.logs = tempfile.mkdtemp(prefix="nos-workers-")

    def start(self, name: str, queues: str = "cpu") -> subprocess.Popen:
        with open(os.path.join(self.logs, f"{name}.log"), "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "nos.cli.main", "worker", "--db", self.db_url, "--broker", self.broker_url,
                 "--queues", queues, "--concurrency", "1", "--name", f"{name}@test"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        """What the worker has printed so far (Celery's log)."""
        with open(os.path.join(self.logs, f"{name}.log"), errors="replace") as log:
            return log.read()

    def kill(self, name: str) -> None:
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()

    def pids(self, name: str) -> set[int]:
        """Every process in the worker's group: the Celery master and its pool children."""
        group = self.processes[name].pid
        pids = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[2]) == group:   # the process group id
                    pids.add(int(entry))
        return pids

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.logs, ignore_errors=True)
