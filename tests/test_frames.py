"""nos.store's data frames of a run's evaluations and trials, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import re
import sys

import pytest

from helpers.reports import NASTY_ERROR
from helpers.store import LRS, RULES


def test_evaluations_frame(two_runs_anywhere):
    import pandas as pd

    from nos.store import evaluations_frame

    store, url, first, second = two_runs_anywhere
    frame = evaluations_frame(store, first["run_id"])
    assert list(frame.seq) == list(range(8))
    for column in ("seq", "batch", "rule", "status", "reward", "test_acc", "best_lr", "wall_seconds", "cached_from",
                   "worker", "created_at", "finished_at", "error", "attempts", "task"):
        assert column in frame.columns
    assert list(frame.status) == ["done", "done", "done", "diverged", "done", "cached", "failed", "queued"]
    assert list(frame.rule[:5]) == RULES
    assert frame.reward[:6].tolist() == [0.9, 0.95, 0.5, 0.0, 0.7, 0.9]
    assert math.isnan(frame.reward[6])
    assert math.isnan(frame.reward[7])
    assert frame.cached_from[5] == first["trained"][0]
    assert frame.cached_from.isna().sum() == 7
    assert frame.error[6] == NASTY_ERROR
    assert frame.worker[6] == "w9"
    assert str(frame.created_at.dtype).startswith("datetime64")
    assert str(frame.created_at.dt.tz) == "UTC"
    assert frame.finished_at.isna().tolist() == [False] * 7 + [True]
    assert frame.reward.dtype == "float64"
    assert frame.depth.dtype == "Int64"
    assert frame.groupby("batch").reward.mean().round(6).tolist() == [0.61, 0.9]

    everything = evaluations_frame(url)   # a URL works too, and None means every run
    assert len(everything) == 13
    assert set(everything.run_id) == {first["run_id"], second["run_id"]}
    assert isinstance(everything, pd.DataFrame)
    with pytest.raises(LookupError, match="no run 99"):
        evaluations_frame(store, 99)


def test_trials_frame(two_runs_anywhere):
    from nos.store import trials_frame

    store, _, first, _ = two_runs_anywhere
    frame = trials_frame(store, first["run_id"])
    assert len(frame) == 5 * len(LRS)   # the five trained evaluations; cached, failed and queued trained nothing
    assert frame.groupby("seq").lr.apply(list).tolist() == [LRS] * 5
    assert frame.diverged.dtype == bool
    assert frame.val_acc.dtype == "float64"
    assert set(frame.rule) == set(RULES)
    best = frame.loc[frame.groupby("seq").val_acc.idxmax()]
    assert best.lr.tolist() == [1e-5] * 5   # result() makes the smallest rate the best


def test_frames_say_how_to_get_pandas(two_runs, monkeypatch):
    from nos.store import evaluations_frame, trials_frame

    store, _, first, _ = two_runs
    monkeypatch.setitem(sys.modules, "pandas", None)
    for function in (evaluations_frame, trials_frame):
        with pytest.raises(ImportError, match=re.escape("pip install pandas")):
            function(store, first["run_id"])
