"""Child process of ``test_multinode.py``: a two-node Ray cluster on this machine, a 2-worker DDP run spread over
both nodes, and a 2-trial sweep, each with a probe hook that records where its workers ran.

``python -c "import sys; sys.path.insert(0, 'tests/platform'); import multinode_child; multinode_child.main()" OUT
TRAIN_ARGS_JSON TUNE_ARGS_JSON`` from the repository root writes a JSON report to OUT.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from pathlib import Path


def _run(main, argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    lines = out.getvalue().strip().splitlines()
    if rc != 0:
        raise SystemExit(f"{main.__module__} exited {rc}:\n" + "\n".join(lines[-20:]))
    return json.loads(lines[-1])


def main() -> None:
    from platform import train, tune
    from platform.ray_runtime import init_ray
    from platform.sweep import run as sweep_run

    import faults
    import ray
    from ray.cluster_utils import Cluster

    out, train_args, tune_args = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        init_ray(cluster.address)  # the CLIs' own runtime environment: the code travels as Ray's working_dir
        faults.picklable()
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        where = out.parent / "where"
        (where / "train").mkdir(parents=True)
        (where / "tune").mkdir(parents=True)
        train.build_trainer = functools.partial(train.build_trainer,
                                                epoch_hooks=[faults.RecordWhere(str(where / "train"))])
        train_summary = _run(train.main, train_args)
        # Trials pause after each epoch so the two overlap (otherwise the second may reuse the first's finished
        # actor, on the same node).
        hooks = [faults.RecordWhere(str(where / "tune")), faults.Pause(2.0)]
        sweep_run.build_tuner = functools.partial(sweep_run.build_tuner, epoch_hooks=hooks)
        tune_summary = _run(tune.main, tune_args)
        records = {kind: [json.loads(p.read_text()) for p in sorted((where / kind).glob("*.json"))]
                   for kind in ("train", "tune")}
        out.write_text(json.dumps({"nodes": nodes, "train": train_summary, "tune": tune_summary, "where": records}))
    finally:
        ray.shutdown()
        cluster.shutdown()
