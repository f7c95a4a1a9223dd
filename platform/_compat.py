"""Making this ``platform`` package importable where the standard library's ``platform`` was imported first.

Two kinds of process import the standard library's ``platform`` before any of our code runs: pytest (via its own
imports) and Ray workers (``ray`` imports it at start-up). In both, ``import platform.train`` would fail with
"'platform' is not a package". :func:`install` fixes that by executing ``platform/__init__.py`` as a package and
putting it in ``sys.modules["platform"]``; it is safe because the package re-exports the standard library's whole
``platform`` API (see ``platform/__init__.py``).

- pytest: the repository-root ``conftest.py`` loads this file by path and calls :func:`install`.
- Ray: :func:`ray_runtime_env` returns the ``runtime_env`` the driver passes to ``ray.init``: the repository as
  ``working_dir`` (so every node has the code) and :func:`worker_setup_hook` as ``worker_process_setup_hook``, which
  Ray runs in every worker process before it deserialises any task. The hook is pickled *by value*
  (``cloudpickle.register_pickle_by_value``): a worker cannot import it by reference, since that would need
  ``platform._compat``, which is exactly what is not importable yet.

Only the standard library may be imported at module level here: the file must load standalone by path.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_ENV_VAR = "COOP_PLATFORM_ROOT"
# Set to "1" in the workers' environment by a quiet driver (the CLIs without --verbose): see quiet_teardown().
QUIET_ENV_VAR = "COOP_QUIET_WORKERS"

# Never shipped to Ray workers as part of the working directory: environments, VCS data, stores, caches, data.
WORKING_DIR_EXCLUDES = (
    "/.venv", "/venv", ".git", "/mlflow.db", "/mlflow.db-journal", "/mlruns", "/mlartifacts", ".cache", "/ray_results",
    "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info", "/build", "/dist", "/data",
)


def is_ours(module: ModuleType | None) -> bool:
    """Whether ``module`` is this package (a package holding this ``_compat.py``), not the stdlib module."""
    return module is not None and hasattr(module, "__path__") and any(
        os.path.isfile(os.path.join(p, "_compat.py")) for p in module.__path__
    )


def install(root: str | None = None) -> ModuleType:
    """Make ``sys.modules["platform"]`` this package (idempotent) and return it.

    Args:
        root: the repository root holding ``platform/__init__.py``; defaults to this file's repository.

    Raises:
        ImportError: ``root`` has no ``platform/__init__.py``.
    """
    current = sys.modules.get("platform")
    if is_ours(current):
        return current
    root = os.path.abspath(root or REPO_ROOT)
    pkg_dir = os.path.join(root, "platform")
    init = os.path.join(pkg_dir, "__init__.py")
    if not os.path.isfile(init):
        raise ImportError(f"cannot install the CoOp platform package: {init} does not exist")
    spec = importlib.util.spec_from_file_location("platform", init, submodule_search_locations=[pkg_dir])
    module = importlib.util.module_from_spec(spec)
    # Executed before it replaces the stdlib module, so __init__ copies the stdlib module's objects.
    spec.loader.exec_module(module)
    sys.modules["platform"] = module
    if root not in sys.path:
        sys.path.append(root)  # coop_core and tune_spaces live beside platform/
    return module


def worker_setup_hook() -> None:
    """Ray ``worker_process_setup_hook``: install this package in a fresh worker process.

    The repository is the worker's working directory (Ray's ``working_dir``), or, failing that, the path in
    ``$COOP_PLATFORM_ROOT`` (a single-node cluster started without ``working_dir``).
    """
    quiet_state_api_warning()
    if os.environ.get(QUIET_ENV_VAR) == "1":
        sys.unraisablehook = quiet_teardown
    candidates = [os.getcwd(), os.environ.get(ROOT_ENV_VAR, ""), *sys.path]
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "platform", "_compat.py")):
            install(candidate)
            return
    raise ImportError(
        f"CoOp platform package not found in the Ray worker (cwd {os.getcwd()}, ${ROOT_ENV_VAR}="
        f"{os.environ.get(ROOT_ENV_VAR)!r}); start Ray through platform.ray_runtime.init_ray()"
    )


def quiet_teardown(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a quiet driver's workers: drop the noise of a worker being stopped.

    When Ray stops a worker (a trial actor at the end of a sweep, or one Tune started for a trial and never used),
    it sends SIGTERM, and Ray's handler raises ``SystemExit`` wherever the worker happens to be -- often inside a
    garbage-collector callback, which cannot raise: Python prints ``Exception ignored in: <function
    WeakSet.__init__.<locals>._remove ...>`` and a traceback ending in ``SystemExit: 1`` (from
    ``ray/_private/worker.py``'s ``sigterm_handler``), and Ray forwards it to the driver's console after the sweep's
    report. The same goes for objects collected while the interpreter finalises. Nothing can act on either; every
    other unraisable exception still goes to the default hook.

    Installed by :func:`worker_setup_hook` when the process starts, so it also covers a worker stopped while it is
    still importing (an actor whose task never ran, which is where the ``WeakSet`` callbacks of ``abc`` churn most).
    """
    if issubclass(unraisable.exc_type, SystemExit) or sys.is_finalizing():
        return
    sys.__unraisablehook__(unraisable)


def quiet_state_api_warning() -> None:
    """Drop Ray Train's once-a-second "Failed to query Ray Train Controller actor state" warning.

    Ray Train's placement-group cleaner polls the state API, which needs Ray's dashboard server (``ray[default]``);
    with a minimal Ray install it logs that warning every second of the run. Cleanup on a normal exit is unaffected.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        lambda record: "Failed to query Ray Train Controller actor state" not in record.getMessage()
    )


def ray_runtime_env(root: str | None = None, *, quiet: bool = False) -> dict[str, Any]:
    """The ``runtime_env`` for ``ray.init`` that makes ``platform.*`` importable in every Ray worker.

    Args:
        root: repository root (defaults to this checkout).
        quiet: the workers drop the tracebacks of being stopped (:func:`quiet_teardown`).
    """
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    root = os.path.abspath(root or REPO_ROOT)
    env: dict[str, Any] = {
        "worker_process_setup_hook": worker_setup_hook,
        "env_vars": {ROOT_ENV_VAR: root, **({QUIET_ENV_VAR: "1"} if quiet else {})},
        "working_dir": root,  # every node gets the code (multi-node clusters need it)
        "excludes": list(WORKING_DIR_EXCLUDES),
    }
    return env
