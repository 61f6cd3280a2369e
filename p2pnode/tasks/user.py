"""Loading a user-supplied task given as ``"package.module:factory"``.

This is the one place where a name from the configuration is imported: it is an explicit,
documented plug-in point. The factory is called with ``data_dir=`` when it accepts that keyword.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from p2pnode.errors import ConfigError, TaskError
from p2pnode.tasks.base import Task

logger = logging.getLogger(__name__)

_ALLOWED = "package.module:factory returning an object with build_model(seed) and load(shard)"


def load_user_task(spec: str, data_dir: str | None) -> Task:
    """Import ``package.module``, call ``factory`` and check that the result looks like a Task.

    Parameters
    ----------
    spec
        ``"package.module:factory"``; ``factory`` may be a dotted attribute path.
    data_dir
        Passed as ``factory(data_dir=data_dir)`` if the factory accepts that keyword.

    Returns
    -------
    Task
        A :class:`Task` instance or a duck-typed object with ``build_model`` and ``load``.

    Raises
    ------
    ConfigError
        If the spec is malformed, the module cannot be imported, the factory does not exist or
        returns something that is not a task.
    TaskError
        If the factory itself raises.
    """
    module_name, attr_path = _split_spec(spec)
    factory = _resolve(spec, module_name, attr_path)
    try:
        task = factory(data_dir=data_dir) if _accepts_data_dir(factory) else factory()
    except Exception as exc:
        raise TaskError(f"user task factory {spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task) and not _is_task_like(task):
        raise ConfigError("task.name", spec, f"{_ALLOWED} (the factory returned a {type(task).__name__})")
    logger.info("loaded user task %s (%s)", spec, type(task).__name__)
    return task  # type: ignore[return-value]


def _split_spec(spec: str) -> tuple[str, str]:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise ConfigError("task.name", spec, _ALLOWED)
    return module_name, attr_path


def _resolve(spec: str, module_name: str, attr_path: str) -> Callable[..., Any]:
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        why = f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        raise ConfigError("task.name", spec, f"{_ALLOWED} ({why})") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError("task.name", spec, f"{_ALLOWED} (module {module_name!r} has no {attr_path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError("task.name", spec, f"{_ALLOWED} ({attr_path!r} is not callable)")
    return obj


def _accepts_data_dir(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "data_dir" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        for p in params
    )


def _is_task_like(obj: object) -> bool:
    return callable(getattr(obj, "build_model", None)) and callable(getattr(obj, "load", None))
