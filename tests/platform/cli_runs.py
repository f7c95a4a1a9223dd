"""Running a CLI's ``main`` inside a test and reading what it logged to MLflow: one helper each, for every test file
that drives ``platform.train``, ``platform.tune``, ``platform.study`` or ``platform.evaluate`` end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any


def aligned_sweep(tmp: Path, *, data_root: Path, shared_data: Path, feature_cache: Path, tiny_vit_config: str
                  ) -> tuple[Path, str, list[str]]:
    """What the end-to-end sweep tests share: the ridge-aligned tiny ViT (``tests/aligned.py``, so configurations
    differ in accuracy), an SQLite store under ``tmp``, and the flags of a small 2-shot EuroSAT run on ``data_root``.

    Returns:
        The checkpoint, the tracking URI and the common flags (``--json`` included; add the batch size and the rest).
    """
    from aligned import aligned_tiny_checkpoint

    checkpoint = aligned_tiny_checkpoint(tiny_vit_config, shared_data, tmp / "tiny-vit-eurosat.pt")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = ["--dataset", "eurosat", "--data-root", str(data_root), "--backbone", tiny_vit_config,
            "--pretrained", str(checkpoint), "--shots", "2", "--n-views", "1", "--max-test-items", "40",
            "--cache-dir", str(feature_cache), "--storage-path", str(tmp / "ray"), "--tracking-uri", uri, "--json"]
    return checkpoint, uri, argv


def run_cli(cli: Any, argv: list[str]) -> dict:
    """Run ``cli.main(argv)`` (a CLI module, or its ``main``) in this process and require exit status 0.

    Returns:
        ``summary`` (the ``--json`` last line), ``report`` (the other stdout lines) and ``stderr``.
    """
    main = getattr(cli, "main", cli)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = out.getvalue().strip().splitlines()
    assert rc == 0, "\n".join(lines[-40:]) + "\n" + err.getvalue()[-4000:]
    return {"summary": json.loads(lines[-1]), "report": "\n".join(lines[:-1]), "stderr": err.getvalue()}


def mlflow_client(uri: str):
    """A client of the tracking store and model registry at ``uri``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def child_runs(client: Any, parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id`` (a sweep's or study's trials)."""
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def forbid_ray_start(monkeypatch: Any) -> None:
    """Make starting Ray fail the test: patches the one launch path every CLI starts Ray through
    (``platform.launch``), and its source, so a bad input refused "before Ray starts" is proved to be."""
    import platform.launch
    import platform.ray_runtime

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(platform.launch, "init_ray", no_ray)
    monkeypatch.setattr(platform.ray_runtime, "init_ray", no_ray)
