"""Child tasks: data as tensors, child networks, and the paper's evaluation protocol.

    from nos.tasks import get_task, evaluate_rule
    result = evaluate_rule("powersign", get_task("digits"), seed=0)
    result.reward, result.best_lr, result.test_acc

Tasks of your own: `from_tensors` / `from_dataset` build one (nos.tasks.build), and a function
marked `@task_factory` is a task `--task package.module:function` names (nos.tasks.custom).
"""

from ..records import EvaluationResult, TrialRecord
from .base import PAPER_LRS, Splits, Task
from .build import from_dataset, from_tensors
from .custom import TaskFactoryError, registered_tasks, task_factory
from .data import DataUnavailable
from .protocol import evaluate_rule
from .registry import TASKS, UnknownTask, get_task

__all__ = [
    "PAPER_LRS", "TASKS", "DataUnavailable", "EvaluationResult", "Splits", "Task", "TrialRecord",
    "TaskFactoryError", "UnknownTask", "evaluate_rule", "from_dataset", "from_tensors", "get_task", "registered_tasks",
    "task_factory",
]
