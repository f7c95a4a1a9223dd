"""What every node of a multi-node Ray cluster must see, checked before a run starts.

Ray workers on any node read the data root and write checkpoints under the Ray storage path, so both must be there
on every node: the data at the same path (shared or replicated), the storage path shared (a shared filesystem, or an
``s3://``-style URI). The feature cache had better be shared too — then features are computed once for the whole
cluster — but a node-local cache still works (it is keyed by content): each node computes its own, and a warning
says so. The MLflow store need not be visible to workers at all: only the driver talks to it. A node that lacks the
data or the storage would fail minutes into the run with a worker traceback; :func:`check_shared_paths` finds it
first, with one line.

How: the driver writes a fresh token file into each writable folder (cache, storage) and one 0-CPU task per alive
node, pinned to it, checks that it sees the data folder and the tokens. A folder that exists on every node but is
node-local (``/tmp/cache`` on each machine) has no token on the other nodes, so it is caught too.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

TOKEN_NAME = ".coop-shared-check"

# (node id, node address, {what: (path, token or None)}) -> {what: problem or None}
Probe = Callable[[str, str, Mapping[str, tuple[str, str | None]]], dict[str, str | None]]


def _check_here(checks: Mapping[str, tuple[str, str | None]]) -> dict[str, str | None]:
    """On a node: for each folder, None when it is there (with the driver's token), else what is wrong."""
    out: dict[str, str | None] = {}
    for what, (path, token) in checks.items():
        if not os.path.isdir(path):
            out[what] = "does not exist"
        elif token is not None:
            try:
                seen = Path(path, TOKEN_NAME).read_text()
            except OSError:
                seen = None
            out[what] = None if seen == token else "exists but is not the driver's folder (node-local, not shared)"
        else:
            out[what] = None
    return out


def ray_probe(node_id: str, address: str, checks: Mapping[str, tuple[str, str | None]]) -> dict[str, str | None]:
    """Run :func:`_check_here` on the node ``node_id`` (a 0-CPU task pinned to it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_check_here).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return ray.get(task.remote(dict(checks)), timeout=120)


def check_shared_paths(data_dir: str, required: Mapping[str, str], preferred: Mapping[str, str] | None = None, *,
                       nodes: list[dict[str, Any]] | None = None, probe: Probe = ray_probe) -> list[str]:
    """Check that every alive node sees ``data_dir`` and each writable folder (``{"--storage-path": path}``).

    URIs (``s3://...``) are not checked. On a one-node cluster nothing is checked.

    Args:
        data_dir: the dataset's folder under the data root (must exist on every node).
        required: flag name -> local folder workers write that must be shared (created on the driver if missing).
        preferred: the same for folders that work node-local too, only slower (the feature cache).
        nodes: ``ray.nodes()`` (default: asked from Ray).
        probe: how a node is asked (tests pass their own).

    Returns:
        One warning line per preferred folder that is not shared (empty when all is shared or on one node).

    Raises:
        ValueError: one line naming the node, the flag, the path and what to do.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) < 2:
        return []
    preferred = dict(preferred or {})
    checks: dict[str, tuple[str, str | None]] = {"--data-root": (data_dir, None)}
    for what, path in {**required, **preferred}.items():
        if "://" in path:
            continue
        Path(path).mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        Path(path, TOKEN_NAME).write_text(token)
        checks[what] = (path, token)
    warnings: dict[str, str] = {}
    for node in alive:
        where = node.get("NodeManagerAddress", node["NodeID"])
        for what, problem in probe(node["NodeID"], where, checks).items():
            if problem is None:
                continue
            path = checks[what][0]
            if what in preferred:
                warnings.setdefault(what, f"{what} {path} is not shared with Ray node {where} ({problem}): each node "
                                          "computes and caches its own image features (share it to compute them once)")
                continue
            raise ValueError(
                f"{what} {path} {problem} on Ray node {where}: every node must see the data root (same path) and "
                "the storage path (mount a shared filesystem there, or use an s3:// URI for --storage-path)")
    return list(warnings.values())
