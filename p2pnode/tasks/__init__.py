"""Learning tasks: the registry of built-in tasks and :func:`make_task`.

Built-in tasks are listed explicitly in :data:`TASKS`; a name containing ``":"`` is a user plug-in
``"package.module:factory"`` (see :mod:`p2pnode.tasks.user`).
"""

from __future__ import annotations

import logging

from p2pnode.errors import ConfigError
from p2pnode.tasks.base import ShardSpec, Task, TaskData
from p2pnode.tasks.charlm import ShakespeareCharLMTask
from p2pnode.tasks.digits import DigitsTask
from p2pnode.tasks.fashion_mnist import FashionMnistTask
from p2pnode.tasks.transfer import FashionMnistTransferTask
from p2pnode.tasks.user import load_user_task

logger = logging.getLogger(__name__)

__all__ = ["TASKS", "ShardSpec", "Task", "TaskData", "make_task"]

TASKS: dict[str, type[Task]] = {
    DigitsTask.name: DigitsTask,
    FashionMnistTask.name: FashionMnistTask,
    FashionMnistTransferTask.name: FashionMnistTransferTask,
    ShakespeareCharLMTask.name: ShakespeareCharLMTask,
}


def make_task(name: str, data_dir: str | None = None) -> Task:
    """Return a task instance for a registered name or a ``"package.module:factory"`` spec.

    Parameters
    ----------
    name
        A key of :data:`TASKS` or ``"package.module:factory"``.
    data_dir
        Directory holding the task's data files; ``None`` means the task's default location.

    Raises
    ------
    ConfigError
        If the name is neither registered nor a plug-in spec, or the plug-in cannot be loaded.
    """
    if name in TASKS:
        return TASKS[name](data_dir=data_dir)  # type: ignore[call-arg]
    if ":" in name:
        return load_user_task(name, data_dir)
    raise ConfigError("task.name", name, ", ".join(TASKS) + ", or package.module:factory")
