"""nos's database: models, engine setup, schema versions, and the functions that read and write it.

    store = open_store()                    # $NOS_DB_URL or sqlite:///nos.db, checked to be up to date
    with store.transaction() as session:    # one write transaction
        attempt = claim(session, evaluation_id, "host:pid", timedelta(minutes=5))
"""

from ..records import EpochRecord, EvaluationResult, TransferResult, TrialRecord  # what the writers take
from .checkpoints import latest_checkpoint, save_checkpoint
from .clock import database_now
from .engine import (
    DEFAULT_URL,
    URL_ENV_VAR,
    DatabaseMissing,
    Store,
    StoreError,
    check_writable,
    create_engine,
    resolve_url,
    shown,
)
from .evaluations import (
    NewEvaluation,
    StaleSweep,
    batch_evaluations,
    claim,
    commit_cached,
    commit_result,
    enqueue_batch,
    equivalence_reason,
    fail,
    find_cached,
    find_equivalent,
    get_evaluation,
    heartbeat,
    requeue_stale,
    trials_of,
    unfinished_ids,
)
from .frames import evaluations_frame, trials_frame  # pandas is imported only when they are called
from .history import (
    EvaluationRow,
    Sweep,
    SweepPoint,
    Timings,
    TrialRow,
    rule_sweeps,
    run_evaluations,
    run_timings,
    run_trials,
    sweep_of,
)
from .models import (
    EVALUATION_STATUSES,
    RUN_STATUSES,
    SCORED_STATUSES,
    Base,
    Checkpoint,
    Evaluation,
    LrTrial,
    Rule,
    Run,
    utcnow,
)
from .queries import LeaderboardRow, RunProgress, leaderboard, list_runs, run_progress
from .rules import RuleRecord, find_rule, get_or_create_rule, get_or_create_rules
from .runs import create_run, get_run, set_run_status
from .schema import SchemaState, check_schema, open_store, schema_state, upgrade
from .transfers import (
    OpenedTransfer,
    StoredTransfer,
    fail_transfer,
    finish_transfer,
    load_transfer,
    open_transfer,
    record_epoch,
    record_trial,
    restart_final,
    transfer_runs_of,
)

__all__ = [
    "DEFAULT_URL", "EVALUATION_STATUSES", "RUN_STATUSES", "SCORED_STATUSES", "URL_ENV_VAR", "Base", "Checkpoint",
    "DatabaseMissing",
    "Evaluation", "EvaluationResult", "LeaderboardRow", "LrTrial", "NewEvaluation", "Rule", "RuleRecord", "Run",
    "RunProgress", "SchemaState", "StaleSweep", "Store", "StoreError", "TrialRecord", "batch_evaluations",
    "check_schema", "check_writable", "claim", "commit_cached", "commit_result", "create_engine", "create_run",
    "database_now",
    "enqueue_batch", "equivalence_reason", "fail", "find_cached", "find_equivalent",
    "find_rule", "get_evaluation", "get_or_create_rule", "get_or_create_rules", "get_run", "heartbeat",
    "latest_checkpoint", "leaderboard", "list_runs", "open_store", "requeue_stale", "resolve_url", "run_progress",
    "save_checkpoint", "schema_state", "set_run_status", "shown", "trials_of", "unfinished_ids", "upgrade",
    "utcnow",
    "EvaluationRow", "Sweep", "SweepPoint", "Timings", "TrialRow", "evaluations_frame", "rule_sweeps",
    "run_evaluations", "run_timings", "run_trials", "sweep_of", "trials_frame",
    "EpochRecord", "OpenedTransfer", "StoredTransfer", "TransferResult", "fail_transfer",
    "finish_transfer", "load_transfer", "open_transfer", "record_epoch", "record_trial", "restart_final",
    "transfer_runs_of",
]
