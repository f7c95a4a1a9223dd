"""A recording ``platform.worker.Session`` for running ``run_training`` without Ray, in this process or a child.

As a child process (from the repository root, so ``platform`` is this package):
``python -c "import sys; sys.path.insert(0, 'tests/platform'); import sessions; sessions.main()" SPEC_JSON OUT``
trains the spec in a fresh process and saves what :class:`RecordingSession` saw to ``OUT`` (``torch.save``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


class RecordingSession:
    """Records every report: the metrics and the checkpoint's context (the folder itself is temporary)."""

    def __init__(self, restore: tuple[Any, list] | None = None) -> None:
        self._restore = restore
        self.reports: list[dict[str, Any]] = []
        self.contexts: list[torch.Tensor] = []

    def restored(self):
        return self._restore

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None) -> None:
        from platform import artifacts

        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            self.contexts.append(artifacts.read_train_state(checkpoint_dir).ctx.clone())

    def outcome(self) -> dict[str, Any]:
        return {"reports": self.reports, "contexts": self.contexts}


def main() -> None:
    from platform.run_spec import RunSpec
    from platform.worker import run_training

    spec = RunSpec.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    session = RecordingSession()
    run_training(spec, session)
    torch.save(session.outcome(), sys.argv[2])
