"""Child tasks: data as tensors, child networks, and the paper's evaluation protocol.

    from nos.tasks import get_task, evaluate_rule
    result = evaluate_rule("powersign", get_task("digits"), seed=0)
    result.reward, result.best_lr, result.test_acc
"""

from ..records import EvaluationResult, TrialRecord
from .base import PAPER_LRS, Splits, Task
from .data import DataUnavailable
from .protocol import evaluate_rule
from .registry import TASKS, UnknownTask, get_task

__all__ = [
    "PAPER_LRS", "TASKS", "DataUnavailable", "EvaluationResult", "Splits", "Task", "TrialRecord",
    "UnknownTask", "evaluate_rule", "get_task",
]
