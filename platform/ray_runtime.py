"""Starting Ray for the platform: the runtime environment that makes ``platform`` importable in every worker, and
what the cluster offers (GPUs or not)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

USE_GPU_VALUES = ("auto", "yes", "no")  # --use-gpu; auto: if the Ray cluster has GPUs

# Ray Tune waits this long for a stopped trial's training thread to end before it reuses the trial's process for
# the next trial (default 2 s, after which the reuse fails and the next trial errors). A stopped CoOp trial ends at
# its next epoch boundary, which on a big dataset can be more than 2 s away.
TRIAL_THREAD_TIMEOUT_S = 600


# Notices Ray logs on every start that tell a user of our CLIs nothing they can act on, by the logger that emits them.
START_UP_CHATTER = {
    # .git/.venv are no longer uploaded with the working_dir -- which is what we want.
    "ray._private.worker": ("is now ignored by default",),
    # A local Ray started by ray.init() has token authentication on by default: a notice, not a problem.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray",),
}


def _not_chatter(messages: tuple[str, ...]):
    return lambda record: not any(m in record.getMessage() for m in messages)


def hide_start_up_chatter() -> None:
    """Filter Ray's start-up notices (:data:`START_UP_CHATTER`) out of the console; idempotent."""
    for name, messages in START_UP_CHATTER.items():
        lg = logging.getLogger(name)
        if not any(getattr(f, "_coop_chatter", False) for f in lg.filters):
            chatter_filter = _not_chatter(messages)
            chatter_filter._coop_chatter = True  # type: ignore[attr-defined]
            lg.addFilter(chatter_filter)


def init_ray(address: str | None = None, *, quiet: bool = True, **ray_init_kwargs: Any) -> bool:
    """``ray.init`` with the ``runtime_env`` that makes ``platform.*`` importable in every worker.

    Ships the repository as ``working_dir`` and installs this package in each worker with a setup hook (see
    ``platform/_compat.py``). Does nothing if Ray was already started this way.

    Args:
        address: a cluster address (``auto``, ``ray://head:10001``) or None for a local instance.
        quiet: hide Ray's start-up notices, and the workers' tracebacks of being stopped (the CLIs pass
            ``not --verbose``).
        ray_init_kwargs: passed to ``ray.init`` (``num_cpus``, ``num_gpus``, ``include_dashboard``...); a
            ``runtime_env`` is merged into ours (its ``env_vars`` added).

    Returns:
        True when this call started (or connected) Ray, False when it was already running.

    Raises:
        RuntimeError: Ray is already initialised without this runtime environment.
    """
    from platform._compat import ROOT_ENV_VAR, ray_runtime_env

    import ray

    if ray.is_initialized():
        if ROOT_ENV_VAR not in (ray.get_runtime_context().runtime_env.get("env_vars") or {}):
            raise RuntimeError("Ray was initialised without platform.ray_runtime.init_ray(): its workers cannot import "
                               "the `platform` package; call init_ray() instead of ray.init()")
        return False
    runtime_env = ray_runtime_env(quiet=quiet)
    extra_env = ray_init_kwargs.pop("runtime_env", None) or {}
    runtime_env["env_vars"] = {**runtime_env["env_vars"], "TUNE_FUNCTION_THREAD_TIMEOUT_S": str(TRIAL_THREAD_TIMEOUT_S),
                               **extra_env.pop("env_vars", {})}
    runtime_env.update(extra_env)
    ray_init_kwargs.setdefault("logging_level", logging.WARNING)
    if quiet:
        hide_start_up_chatter()
    # No address means a Ray of our own, as the CLIs' --ray-address promises: a bare ray.init() would instead join
    # whatever Ray another program started on this machine (Ray picks "the latest cluster" it finds), and a sweep
    # would die with it. $RAY_ADDRESS still chooses a cluster explicitly.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray_init_kwargs.setdefault("dashboard_host", "127.0.0.1")  # a local dashboard is never on a public interface
    ray.init(address=address, runtime_env=runtime_env, **ray_init_kwargs)
    return True


def resolve_use_gpu(value: str | bool) -> bool:
    """``yes``/``no``/``auto`` -> bool; ``auto``: does the Ray cluster (call after :func:`init_ray`) have GPUs?"""
    if isinstance(value, bool):
        return value
    value = value.lower()
    if value in ("yes", "true", "1"):
        return True
    if value in ("no", "false", "0"):
        return False
    if value != "auto":
        raise ValueError(f"use_gpu must be auto, yes or no, got {value!r}")
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()
