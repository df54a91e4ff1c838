"""Distributed runs: real Redis, real `nos worker` processes, killed workers, a flushed broker.

The two central cases run on SQLite and PostgreSQL; the others on one each, to keep the suite short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from nos.store import database_now, open_store
from nos.store.leases import LeaseRefused, take_lease
from nos.store.models import Run
from nos.workers.executor import live_workers

from helpers.driver import (
    assert_complete,
    assert_learned_once,
    driving,
    finished_count,
    nos,
    run_rows,
    start_nos,
    wait_for,
)

# Every test here starts Celery workers or `nos` processes against a real broker.
pytestmark = pytest.mark.slow

# Evaluations of a second or two: long enough to kill a worker in the middle of one.
SLOW_TOML = """
task = "digits"
budget = 10
update_every = 5
depth = 1
seed = 5
stale_after = 4.0
heartbeat_every = 1.0

[task_options]
train_size = 1200
lrs = [0.001, 0.01, 0.1]
epochs = 3
"""


@pytest.fixture
def slow_toml(tmp_path) -> str:
    path = tmp_path / "slow.toml"
    path.write_text(SLOW_TOML)
    return str(path)


def expect_success(driver: subprocess.Popen) -> None:
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out


def test_a_search_with_two_workers_completes(db_url, broker, workers, slow_toml):
    workers.start("w1")
    workers.start("w2")
    result = nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Celery at" in result.stdout
    assert_complete(db_url, 1, 10)
    assert len({e.worker for e in run_rows(db_url, 1) if e.worker}) == 2   # both trained (rejected rules: none)


def test_a_worker_killed_mid_evaluation_is_redone_by_the_other(db_url, broker, workers, slow_toml):
    workers.start("w1")
    workers.start("w2")
    with driving("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker) as driver:
        host_pids = workers.pids("w1")

        def w1_running():
            for e in run_rows(db_url, 1):
                if e.status == "running" and int(e.worker.rsplit(":", 1)[1]) in host_pids:
                    return e.id
            host_pids.update(workers.pids("w1"))
            return None

        victim = wait_for(w1_running)
        workers.kill("w1")
        expect_success(driver)
    assert_complete(db_url, 1, 10)
    redone = next(e for e in run_rows(db_url, 1) if e.id == victim)
    assert redone.attempts == 2
    assert redone.status in ("done", "diverged")
    assert int(redone.worker.rsplit(":", 1)[1]) not in host_pids   # finished by the other worker
    store = open_store(db_url)
    with store.reading() as session:   # each learning rate stored once, nothing counted twice
        from sqlalchemy import func, select

        from nos.store.models import LrTrial
        per_eval = session.execute(select(func.count()).select_from(LrTrial)
                                   .where(LrTrial.evaluation_id == victim)).scalar_one()
    store.dispose()
    assert per_eval == 3 or redone.status == "diverged"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_flushed_broker_loses_nothing(db_url, broker, workers, slow_toml):
    import redis

    workers.start("w1")
    with driving("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker) as driver:
        wait_for(lambda: finished_count(db_url, 1) >= 1)
        redis.Redis.from_url(broker).flushdb()   # every queued and unacknowledged message is gone
        expect_success(driver)
    assert_complete(db_url, 1, 10)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_killed_driver_is_resumed(db_url, broker, workers, slow_toml):
    workers.start("w1")
    driver = start_nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker)
    wait_for(lambda: finished_count(db_url, 1) >= 2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert finished_count(db_url, 1) < 10
    resumed = nos("resume", "1", "--db", db_url, "--broker", broker)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete(db_url, 1, 10)
    assert_learned_once(db_url, 1, 5)   # the asynchronous driver: no result learned from twice or lost


# Fast evaluations, three kept queued: what `nos stop` leaves in the broker.
QUEUED_TOML = """
task = "digits"
budget = 4
update_every = 2
in_flight = 3
depth = 1
seed = 5
stale_after = 4.0
heartbeat_every = 1.0

[task_options]
train_size = 300
lrs = [0.01, 0.1]
epochs = 1
"""


def drained(broker: str) -> bool:
    """No message waiting in the `cpu` queue nor taken and not yet acknowledged, twice half a second apart."""
    import redis

    client = redis.Redis.from_url(broker)
    for _ in range(2):
        if client.llen("cpu") or client.hlen("unacked"):
            return False
        time.sleep(0.5)
    return True


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_stopped_runs_queued_messages_wait_for_its_resume(db_url, broker, workers, tmp_path):
    import redis

    config = tmp_path / "queued.toml"
    config.write_text(QUEUED_TOML)
    # No worker yet: the driver's messages wait in Redis, as they would behind busy workers.
    with driving("enqueue", "--config", str(config), "--db", db_url, "--broker", broker) as driver:
        wait_for(lambda: sum(e.status == "queued" for e in run_rows(db_url, 1)) >= 3)
        stop = nos("stop", "1", "--db", db_url)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        out, _ = driver.communicate(timeout=120)
        assert driver.returncode == 3, out   # stopped, resumable
    before = run_rows(db_url, 1)
    queued = {e.id for e in before if e.status == "queued"}
    assert len(queued) >= 3 and all(e.status in ("queued", "rejected") for e in before)
    assert redis.Redis.from_url(broker).llen("cpu") >= 1
    workers.start("w1")   # takes every waiting message, and drops it: the run is stopped
    wait_for(lambda: drained(broker), timeout=180, every=0.2)
    after = run_rows(db_url, 1)
    assert [(e.id, e.status, e.attempts, e.worker) for e in after] == \
        [(e.id, e.status, e.attempts, e.worker) for e in before]
    assert all(e.reward is None for e in after if e.id in queued)
    resumed = nos("resume", "1", "--db", db_url, "--broker", broker)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete(db_url, 1, 4)
    trained = [e for e in run_rows(db_url, 1) if e.id in queued]
    assert all(e.status in ("done", "diverged", "cached") and e.attempts == 1 for e in trained)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_detached_runs_are_driven_by_a_control_worker(db_url, broker, workers, slow_toml):
    workers.start("w1")
    workers.start("driver", queues="control")
    started = time.monotonic()
    enqueue = subprocess.Popen([sys.executable, "-m", "nos.cli.main", "enqueue", "--config", slow_toml, "--db", db_url,
                                "--broker", broker, "--detach"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)

    def driver():
        store = open_store(db_url)
        try:
            with store.reading() as session:
                run = session.get(Run, 1)
                return run.driver if run is not None else None
        except Exception:   # the database is not created yet
            return None
        finally:
            store.dispose()

    # The control worker holds the run's driver lease: a second driver is refused, naming it. Watched
    # while `nos enqueue` is still exiting: on a loaded machine the run can end before that.
    holder = wait_for(driver, timeout=120, every=0.1)
    store = open_store(db_url)
    with pytest.raises(LeaseRefused, match=f"run 1 is already driven by {holder}"):
        with store.transaction() as session:
            take_lease(session, 1, "elsewhere:1")
    store.dispose()
    assert int(holder.rsplit(":", 1)[1]) in workers.pids("driver")
    out, err = enqueue.communicate(timeout=120)
    assert enqueue.returncode == 0, out + err
    assert "sent to the control queue" in out
    assert time.monotonic() - started < 60   # returned without waiting for the run

    def completed():
        store = open_store(db_url)
        with store.reading() as session:
            status = session.get(Run, 1).status
        store.dispose()
        return status == "completed"

    wait_for(completed, timeout=300, every=0.5)
    assert_complete(db_url, 1, 10)
    assert driver() is None   # released with the run's end
    status = nos("status", "1", "--db", db_url, "--broker", broker)
    assert "live workers" in status.stdout
    assert "w1@test (cpu)" in status.stdout
    assert "driver@test (control)" in status.stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_status_of_a_detached_run_with_no_control_worker_says_to_start_one(db_url, broker, workers, slow_toml):
    """It said "waiting for a control worker" beside a list of live workers none of which takes the control
    queue (a ping names workers, not their queues)."""
    workers.start("w1")
    sent = nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker, "--detach")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: "w1@test (cpu)" in nos("status", "1", "--db", db_url, "--broker", broker).stdout,
             timeout=60, every=1)
    status = nos("status", "1", "--db", db_url, "--broker", broker).stdout
    assert ("no live driver: no live worker takes the control queue; start one with `nos worker --queues control`"
            in status), status


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_detached_run_meeting_a_dead_hosts_fresh_lease_is_driven_when_it_goes_stale(db_url, broker, workers,
                                                                                      slow_toml):
    """A control worker killed on one host has its `nos.drive` redelivered to another while the dead
    driver's lease still looks live there: the message waits for the lease to go stale, then drives."""
    workers.start("w1")
    sent = nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker, "--detach")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    store = open_store(db_url)

    def renew_as_the_other_host():   # 20 s old at each renewal: live, and stale 10 s after the last
        with store.transaction() as session:
            session.execute(update(Run).where(Run.id == 1).values(
                driver="gone-host:1", driver_heartbeat_at=database_now(session) - timedelta(seconds=20)))

    renew_as_the_other_host()
    workers.start("driver", queues="control")
    # The other host lives until the control worker is up (it takes the queued message as it starts), then dies.
    wait_for(lambda: renew_as_the_other_host() or "driver@test" in live_workers(broker), timeout=120, every=0.2)
    store.dispose()

    def status():
        store = open_store(db_url)
        with store.reading() as session:
            run = session.get(Run, 1)
            answer = run.status, run.driver
        store.dispose()
        return answer

    wait_for(lambda: status()[1] not in (None, "gone-host:1"), timeout=120, every=0.2)
    assert int(status()[1].rsplit(":", 1)[1]) in workers.pids("driver")
    wait_for(lambda: status()[0] == "completed", timeout=300, every=0.5)
    assert_complete(db_url, 1, 10)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_search_no_worker_takes_says_so_once_and_where_the_evaluations_wait(db_url, broker, slow_toml):
    """A broker in $NOS_BROKER_URL alone sends a search to Celery workers: with none started it waited in
    silence, and --workers (local ones) was taken without a word."""
    env = {**os.environ, "NOS_BROKER_URL": broker}
    driver = subprocess.Popen([sys.executable, "-m", "nos.cli.main", "enqueue", "--config", slow_toml, "--db", db_url,
                               "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        time.sleep(20)   # the wait is stale_after (4 s here), at least 10 s
    finally:
        os.killpg(driver.pid, signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert "warning: --workers sets local workers, and this run's evaluations go to Celery workers" in err
    said = [line for line in err.splitlines() if line.startswith("nos: no worker has taken an evaluation of run 1")]
    assert len(said) == 1, err
    assert f"they wait in the cpu queue of {broker}: start a worker with `nos worker --broker {broker} --queues cpu`" \
        in said[0]
    assert "(none runs, all are busy elsewhere, or they use another database, which their logs say)" in said[0]


ONLY_IN_THE_DRIVER = """
import torch
from torch import nn
from nos.tasks import from_tensors, task_factory

@task_factory
def points(*, device="cpu", **protocol):
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    return from_tensors(x, (x[:, 0] > 0).long(), lambda: nn.Linear(4, 2), device=device, **protocol)
"""


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_search_every_worker_refuses_says_why_in_the_drivers_line(db_url, broker, workers, tmp_path):
    """The driver said "none runs, or all are busy elsewhere" while a worker ran and refused every evaluation,
    its reason stored on them (here: the task's module is importable by the driver only)."""
    (tmp_path / "driver_only_tasks.py").write_text(ONLY_IN_THE_DRIVER)
    config = tmp_path / "refused.toml"
    config.write_text('task = "driver_only_tasks:points"\nbudget = 4\nstale_after = 4.0\nheartbeat_every = 1.0\n')
    workers.start("w1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-m", "nos.cli.main", "enqueue", "--config", str(config), "--db",
                               db_url, "--broker", broker], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(25)   # the worker's first refusal, then stale_after (4 s here, at least 10 s) without a claim
    finally:
        os.killpg(driver.pid, signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    said = [line for line in err.splitlines() if line.startswith("nos: no worker has taken an evaluation of run 1")]
    assert len(said) == 1, err
    assert "(workers refuse them (the last: refused by " in said[0]
    assert "its driver_only_tasks:points task cannot be built here" in said[0]


def run_state(db_url: str, run_id: int = 1) -> tuple[str, str | None]:
    store = open_store(db_url)
    with store.reading() as session:
        run = session.get(Run, run_id)
        answer = run.status, run.driver
    store.dispose()
    return answer


def holder_pid(holder: str | None) -> int | None:
    return None if holder is None else int(holder.rsplit(":", 1)[1])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_control_worker_killed_whole_has_its_run_driven_by_the_next(db_url, broker, workers, slow_toml):
    """Its main process killed too, the control worker leaves its `nos.drive` unacknowledged in Redis for the
    6-hour visibility timeout; another control worker sends the driverless run's driver loop again."""
    workers.start("w1")
    workers.start("driver", queues="control")
    sent = nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker, "--detach")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_for(lambda: finished_count(db_url, 1) >= 2, timeout=180)
    assert holder_pid(run_state(db_url)[1]) in workers.pids("driver")
    workers.kill("driver")
    assert run_state(db_url)[0] == "running" and finished_count(db_url, 1) < 10
    workers.start("other", queues="control")
    wait_for(lambda: holder_pid(run_state(db_url)[1]) in workers.pids("other"), timeout=120, every=0.2)
    wait_for(lambda: run_state(db_url)[0] == "completed", timeout=300, every=0.5)
    assert_complete(db_url, 1, 10)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_detached_run_whose_message_the_broker_lost_is_driven(db_url, broker, workers, slow_toml):
    """The broker flushed before any control worker took the run's `nos.drive`: a control worker started
    later finds the run without a driver and sends its driver loop again."""
    import redis

    workers.start("w1")
    sent = nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker, "--detach")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    redis.Redis.from_url(broker).flushdb()
    workers.start("driver", queues="control")
    wait_for(lambda: run_state(db_url)[0] == "completed", timeout=300, every=0.5)
    assert_complete(db_url, 1, 10)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_malformed_message_is_refused_and_the_worker_trains_on(db_url, broker, workers, slow_toml):
    """A JSON body of another shape than Celery's [args, kwargs, embed] made the worker's main process exit,
    and went back to the queue for the next worker: one message stopped every worker."""
    import json
    import uuid

    import redis
    from kombu import Connection, Producer

    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    bodies = [({"a": 1}, {}), ([[1], {}], {}), ([["1"], {}, {}], {}), ([[1], {"x": 2}, {}], {}),
              # Headers Celery reads before any task runs: each stopped the worker, or made it reconnect forever.
              ([[1], {}, embed], {"task": ["nos.evaluate"]}), ([[1], {}, embed], {"timelimit": "abc"}),
              ([[1], {}, embed], {"expires": "garbage"}), ([[1], {}, embed], {"id": None}),
              # Celery's own tasks, and callbacks run after ours: not what nos sends.
              ([[[["nos.evaluate", [1]]]], {}, embed], {"task": "celery.starmap"}),
              ([[1], {}, {**embed, "callbacks": [{"task": "nos.drive", "args": [1], "kwargs": {}, "options": {},
                                                  "subtask_type": None, "immutable": False}]}], {})]
    with Connection(broker) as connection:
        for body, changed in bodies:
            tid = str(uuid.uuid4())
            headers = {"lang": "py", "task": "nos.evaluate", "id": tid, "root_id": tid, "parent_id": None,
                       "group": None, "argsrepr": "?", "kwargsrepr": "{}", "origin": "test", "retries": 0,
                       "eta": None, "expires": None, **changed}
            Producer(connection.channel()).publish(json.dumps(body), routing_key="cpu", exchange="",
                                                   content_type="application/json", content_encoding="utf-8",
                                                   headers=headers, serializer=None)
    queue = redis.Redis.from_url(broker)
    # Items that are no kombu envelope failed inside kombu as it took them off the list: the worker stopped
    # (exit status 1), or reconnected (kombu counts a KeyError as a lost connection).
    envelope = json.loads(kombu_envelope())
    properties = envelope["properties"]
    garbled = [b"not json", b"\xff\xfe", b"[1, 2]", json.dumps({"properties": 3}),
               json.dumps({**envelope, "headers": "x"}), json.dumps({**envelope, "properties": {}}),
               json.dumps({**envelope, "properties": {**properties, "delivery_tag": None}}),
               json.dumps({**envelope, "properties": {**properties, "delivery_tag": True}}),
               json.dumps({**envelope, "properties": {**properties, "delivery_info": {"routing_key": "cpu"}}}),
               json.dumps({**envelope, "body": 5})]
    for item in garbled:
        queue.lpush("cpu", item)
    worker = workers.start("w1")
    wait_for(lambda: queue.llen("cpu") == 0 and not queue.hlen("unacked"), timeout=120, every=0.2)
    # The same on the fanout channel every worker listens to for Celery's remote control (`nos status` pings).
    database = broker.rsplit("/", 1)[1]
    assert queue.publish(f"/{database}.celery.pidbox", json.dumps({"properties": 3})) == 1
    result = nos("enqueue", "--config", slow_toml, "--db", db_url, "--broker", broker)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_complete(db_url, 1, 10)
    assert worker.poll() is None
    assert queue.llen("cpu") == 0 and not queue.hlen("unacked")   # refused for good, not put back
    log = workers.log("w1")
    assert log.count("message refused") >= 7 + len(garbled), log
    assert log.count("an item that is not a message") == len(garbled) + 1, log   # and the remote-control one
    assert "Connection to broker lost" not in log


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_worker_that_celery_cannot_keep_running_exits_with_a_failure(db_url, broker, workers):
    """A broker whose `unacked` key is not a hash answers kombu's first delivery with an error, and Celery
    cannot keep the worker running. It exited 0 (app.worker_main drops the status), so a supervisor
    restarting failed workers left it down."""
    import redis

    queue = redis.Redis.from_url(broker)
    queue.set("unacked", "not a hash")
    worker = workers.start("w1")
    queue.lpush("cpu", kombu_envelope())
    assert worker.wait(timeout=120) == 1
    assert "WRONGTYPE" in workers.log("w1")


def kombu_envelope() -> str:
    """A kombu envelope as Redis holds it, of an evaluate message for evaluation 1 (its headers empty)."""
    import json

    return json.dumps({"body": "W1sxXSwge30sIHt9XQ==", "content-encoding": "utf-8",
                       "content-type": "application/json", "headers": {},
                       "properties": {"delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                                      "delivery_info": {"exchange": "", "routing_key": "cpu"},
                                      "delivery_tag": "d6b1b0a4-0000-4000-8000-000000000001"}})


def test_the_broker_away_as_the_driver_sends_is_one_line_and_the_evaluations_stay_queued(tmp_path):
    """A Redis restart while a driver dispatches: it used to raise out of the driver, failing the run."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                        text=True).stdout.strip() == "PONG", timeout=30)
        # The executor meets the broker, then the broker goes away before it sends.
        sent = subprocess.run([sys.executable, "-c", f"""
import subprocess
from nos.workers.executor import CeleryExecutor
executor = CeleryExecutor({url!r})
subprocess.run(["redis-cli", "-p", "{port}", "shutdown", "nosave"])
executor.dispatch([7, 8, 9])
print("dispatched")
"""], capture_output=True, text=True, timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    assert sent.returncode == 0, sent.stderr
    assert "dispatched" in sent.stdout
    said = [line for line in sent.stderr.splitlines() if line.startswith("nos:")]
    assert len(said) == 1 and "the broker is unreachable" in said[0] and "3 evaluations stay queued" in said[0]


def test_bad_broker_or_database_exits_2_and_writes_nothing(tmp_path, broker, slow_toml):
    db = tmp_path / "never.db"
    for args, message in [
        (("enqueue", "--config", slow_toml, "--broker", "redis://127.0.0.1:1/0"), "cannot reach the broker"),
        (("enqueue", "--config", slow_toml, "--broker", "amqp://x"), "must be redis://"),
        (("enqueue", "--config", slow_toml, "--detach"), "--detach needs a broker"),
        (("worker", "--broker", "redis://127.0.0.1:1/0"), "cannot reach the broker"),
        (("worker",), "needs a broker"),
        (("worker", "--queues", "cpu,control", "--broker", broker), "the control queue needs a worker of its own"),
    ]:
        result = nos(*args, "--db", f"sqlite:///{db}")
        assert result.returncode == 2, result.stderr
        assert message in result.stderr, result.stderr
        assert not db.exists()
    down = nos("worker", "--broker", broker, "--db", "postgresql://nos@127.0.0.1:1/nos")
    assert down.returncode == 2
    assert "cannot" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
