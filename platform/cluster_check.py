"""What every node of a multi-node Ray cluster must see, checked before a run starts.

Ray workers on any node read the data root, read and write the feature cache, and write checkpoints under the Ray
storage path; so these three must be the same folders on every node (a shared filesystem, or ``s3://``-style URIs for
the storage path). The MLflow store need not be: only the driver talks to it. A node that lacks one would fail
minutes into the run with a worker traceback; :func:`check_shared_paths` finds it first, with one line.

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


def check_shared_paths(data_dir: str, writable: Mapping[str, str], *, nodes: list[dict[str, Any]] | None = None,
                       probe: Probe = ray_probe) -> int:
    """Check that every alive node sees ``data_dir`` and each folder in ``writable`` (``{"--cache-dir": path}``).

    URIs (``s3://...``) are not checked. On a one-node cluster nothing is checked.

    Args:
        data_dir: the dataset's folder under the data root (must exist on every node).
        writable: flag name -> local folder that workers write (created on the driver if missing).
        nodes: ``ray.nodes()`` (default: asked from Ray).
        probe: how a node is asked (tests pass their own).

    Returns:
        The number of nodes checked.

    Raises:
        ValueError: one line naming the node, the flag, the path and what to do.
    """
    if nodes is None:
        import ray

        nodes = ray.nodes()
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) < 2:
        return 0
    checks: dict[str, tuple[str, str | None]] = {"--data-root": (data_dir, None)}
    for what, path in writable.items():
        if "://" in path:
            continue
        Path(path).mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        Path(path, TOKEN_NAME).write_text(token)
        checks[what] = (path, token)
    for node in alive:
        problems = probe(node["NodeID"], node.get("NodeManagerAddress", "?"), checks)
        for what, problem in problems.items():
            if problem is not None:
                path = checks[what][0]
                raise ValueError(
                    f"{what} {path} {problem} on Ray node {node.get('NodeManagerAddress', node['NodeID'])}: every "
                    "node must see the same data root, cache and storage path (mount a shared filesystem there, or "
                    "use an s3:// URI for --storage-path)")
    return len(alive)
