"""The training function of a packed trial: several configurations trained together on one CLIP in one process
(``coop_core.pack.train_pack``), each reported, checkpointed, early-stopped and finished as its own run.

Each member is prepared exactly as a solo run prepares (``platform.worker.prepare_run``: the warm cache loads CLIP,
the splits and each shots/seed's features once), so a member's checkpoint folder holds what a solo trial's holds --
its state, history and ``config.json``, and at its last epoch its prompts and final metrics -- and the driver logs,
registers and serves it the same way. The pack's checkpoint is one folder per member (named by member id) plus
``pack.json`` (each member's status); every checkpoint holds every member's latest state, so a retried or resumed pack
continues each member from its own last epoch and leaves stopped, failed and finished members as they were.

A pack checkpoints at the members' checkpoint interval and whenever a member ended (its last epoch, an ASHA stop, a
diverged loss): a member's final artifacts are always in a checkpoint. An ended member's folder is written once, when
it ends, and linked into the pack's later checkpoints (its prompts, nearest words and final metrics do not change).
The running members' folders are written only when the checkpoint is reported: until then a checkpoint is a snapshot
in memory (each member's :class:`TrainState` is already a copy), so a checkpoint replaced while waiting is never
written (a tiny pack of 18 at 20 epochs sends 6 reports, and wrote 20 checkpoints: 4.9 s of wall time before, 4.5 s
now).

Reports go to Tune from a thread of their own (:class:`_Reporter`), so the pack trains on while the driver takes one:
a Tune function trainable's report waits until the driver has processed it and asked for the next (55 ms a report
on the 2-core machine with two packs training, a fifth of a tiny pack's wall time at 200 epochs). Epochs that end
while a report is on its way, or within ``REPORT_INTERVAL_S`` of the last one, go in the next report together: its
``"member_epochs"`` holds each member's epoch rows since the previous report (``packs.MEMBER_EPOCHS_KEY``), so the
driver still logs every epoch of every member, and a newer checkpoint replaces a waiting one (every checkpoint holds
every member's latest state). The pack's last report, with its last checkpoint, is taken before the pack returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from platform import artifacts
from platform.progress import ProgressFn
from platform.run_spec import RunSpec
from platform.sweep.packs import (
    FAILED,
    FINISHED,
    MEMBER_EPOCHS_KEY,
    MEMBERS_KEY,
    PACK_FILE,
    RUNNING,
    STATUS_KEY,
    STOPPED,
)
from platform.worker import EpochHook, PreparedRun, final_metrics, prepare_run, write_final_artifacts
from typing import Any

import torch

from coop_core import SingleProcess, TrainState
from coop_core.pack import MemberResult, PackMember, train_pack

logger = logging.getLogger(__name__)

# ASHA's decision for a member: stop(member id, epoch, val_acc) -> True to stop it there.
StopRule = Callable[[str, int, float | None], bool]

REPORT_INTERVAL_S = 1.0  # a pack reports at most this often (its last report aside); epochs in between go together


class _Report:
    """A report waiting to be sent: the pack's metrics, each member's epoch rows since the previous report, and the
    pack's checkpoint if any, as a function that writes it into a new temporary directory (called when the report is
    sent; a checkpoint replaced while waiting is never written)."""

    def __init__(self, metrics: dict[str, Any], rows: dict[str, list[dict[str, Any]]],
                 checkpoint: Callable[[], tempfile.TemporaryDirectory] | None) -> None:
        self.metrics, self.rows, self.checkpoint = metrics, rows, checkpoint

    def merge(self, newer: _Report) -> None:
        """Take ``newer``'s metrics and checkpoint (if it has one) and add its rows after this one's."""
        self.metrics = newer.metrics
        for mid, rows in newer.rows.items():
            self.rows.setdefault(mid, []).extend(rows)
        if newer.checkpoint is not None:
            self.checkpoint = newer.checkpoint


class _Reporter:
    """Sends a pack's reports to ``session`` from a thread of its own, one at a time, at most every ``interval``
    seconds; what is put meanwhile is merged into the one report waiting (see the module docstring).

    ``put`` and ``close`` raise what a report raised in that thread (``SystemExit`` when Tune stops the trial, as
    Tune's report would have raised in the training thread).
    """

    def __init__(self, session: Any, interval: float = REPORT_INTERVAL_S) -> None:
        self._session, self._interval = session, interval
        self._cond = threading.Condition()
        self._waiting: _Report | None = None
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pack-reports", daemon=True)
        self._thread.start()

    def put(self, report: _Report) -> None:
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._waiting is None:
                self._waiting = report
            else:
                self._waiting.merge(report)
            self._cond.notify()

    def close(self, *, raise_error: bool = True) -> None:
        """Send what is waiting, stop the thread, and raise what a report raised (``raise_error``)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None and raise_error:
            raise self._error

    def _run(self) -> None:
        sent_at = -math.inf
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                while not self._closed and time.monotonic() - sent_at < self._interval:
                    self._cond.wait(self._interval - (time.monotonic() - sent_at))
                report, self._waiting = self._waiting, None
            if report is None:
                return
            folder = None
            try:
                folder = report.checkpoint() if report.checkpoint is not None else None
                metrics = report.metrics | {MEMBER_EPOCHS_KEY: report.rows}
                self._session.report(metrics, Path(folder.name) if folder is not None else None)
            except BaseException as err:  # SystemExit: Tune stops the trial; anything else (a full disk) fails it
                with self._cond:
                    self._error, self._waiting = err, None
                return
            finally:
                if folder is not None:
                    folder.cleanup()
            sent_at = time.monotonic()


class _Member:
    """One configuration of the pack: its spec, what it trains with, its history, state and status."""

    def __init__(self, mid: str, spec: RunSpec, prep: PreparedRun) -> None:
        self.mid, self.spec, self.prep = mid, spec, prep
        self.config = prep.resolved | {"resumed_from_epoch": None}  # its checkpoints' config.json
        self.history: list[dict[str, Any]] = []
        self.state: TrainState | None = None
        self.status = RUNNING
        self.failure: str | None = None
        self.report: dict[str, Any] = {}
        self.ended_now = False  # ended in the pack's current epoch: the pack checkpoints
        self.frozen: Path | None = None  # an ended member's folder, written once and linked into later checkpoints
        self.reported = 0  # how many of its history's epochs have gone to the reporter

    @property
    def epochs(self) -> int:
        return self.spec.train.resolved_epochs

    def freeze(self, keep: Path) -> None:
        """Write an ended member's folder under ``keep``, once, as a solo trial's last checkpoint (sealed): its state,
        history and config, and its prompts, nearest words and final metrics (or its failure)."""
        if self.frozen is not None or self.status == RUNNING:
            return
        d = keep / self.mid
        d.mkdir()
        if self.status == FAILED:
            artifacts.write_failure(d, self.failure or "failed", self.history, self.config)
        else:
            artifacts.write_checkpoint(d, self.state, self.history, self.config)
            if self.status == FINISHED:
                write_final_artifacts(d, self.spec, self.prep.clip, self.prep.splits, self.prep.model, self.report)
        artifacts.seal(d)
        self.frozen = d

    def saved(self) -> Callable[[Path], None] | None:
        """What this member's folder in a pack checkpoint taken now holds, as a function writing it into a folder
        (None: nothing to save yet). An ended member's is linked from its frozen folder; a running member's is its
        state and history as they are now, written when called."""
        if self.frozen is not None:
            frozen = self.frozen
            return lambda d: shutil.copytree(frozen, d, copy_function=_link_or_copy)
        if self.state is None:
            return None
        state, history, config = self.state, tuple(self.history), self.config

        def write(d: Path) -> None:
            d.mkdir()
            artifacts.write_checkpoint(d, state, history, config)
            artifacts.seal(d)
        return write


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (an ended member's files never change, and every checkpoint is a folder on the same disk as the
    pack's temporary ones), or a copy where links are refused."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _checkpoint_writer(saved: dict[str, Callable[[Path], None]], pack: str
                       ) -> Callable[[], tempfile.TemporaryDirectory]:
    """The function that writes a pack checkpoint (each member's folder and ``pack.json``, sealed) into a new temporary
    directory, from what was saved when it was taken."""
    def write() -> tempfile.TemporaryDirectory:
        checkpoint = tempfile.TemporaryDirectory(prefix="coop-pack-checkpoint-")
        try:
            root = Path(checkpoint.name)
            for mid, save in saved.items():
                save(root / mid)
            (root / PACK_FILE).write_text(pack)
            artifacts.seal(root)
        except BaseException:
            checkpoint.cleanup()
            raise
        return checkpoint
    return write


def _restore(session: Any, members: Sequence[_Member], keep: Path) -> None:
    """Each member's state, history and status from the pack's last checkpoint, if the trial was restarted (an ended
    member's folder kept under ``keep`` as it was)."""
    checkpoint = session.checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as root:
        artifacts.verify(root)
        saved = json.loads((Path(root) / PACK_FILE).read_text())
        for m in members:
            d = Path(root) / m.mid
            m.status, m.failure = saved[m.mid]["status"], saved[m.mid].get("failure")
            m.report = saved[m.mid].get("report", {})
            m.history = artifacts.read_history(d)
            if m.status != FAILED:
                m.state = artifacts.read_train_state(d)
            if m.status != RUNNING:
                m.frozen = Path(shutil.copytree(d, keep / m.mid))
    logger.info("resuming a pack of %d: %s", len(members),
                ", ".join(f"{m.mid} {m.status} after epoch {m.state.epoch if m.state else '-'}" for m in members))


def run_pack(member_ids: Sequence[str], specs: Sequence[RunSpec], session: Any, *, device: torch.device,
             stop: StopRule | None = None, progress: ProgressFn | None = None,
             epoch_hooks: Sequence[EpochHook] = ()) -> None:
    """Train the configurations ``specs`` (member ids ``member_ids``) as one pack, reporting to ``session`` (a Tune
    session: ``report(metrics, checkpoint_dir)`` and ``checkpoint()``) each member's latest report under
    ``"members"`` and its epochs since the previous report under ``"member_epochs"`` (see the module docstring);
    ``stop`` is ASHA's decision per member (None: no early stopping); ``epoch_hooks`` are called after each pack
    epoch was handed to the reporter, with ``(epoch, 0)``, as a solo run calls them after its report."""
    t_start, entered_at = time.perf_counter(), time.time()
    others = sorted({spec.method.name for spec in specs} - {"coop"})
    if others:  # the launch path refuses these (plan.check_pack_methods); a pack has no other method's loss
        raise ValueError(f"a pack trains CoOp configurations only, got {', '.join(others)}")
    members = []
    for mid, spec in zip(member_ids, specs, strict=True):
        torch.manual_seed(spec.train.seed)
        members.append(_Member(mid, spec, prepare_run(spec, device, SingleProcess(), progress)))
    t_setup = time.perf_counter() - t_start
    keep_dir = tempfile.TemporaryDirectory(prefix="coop-pack-")  # ended members' folders, for every later checkpoint
    keep = Path(keep_dir.name)
    _restore(session, members, keep)
    interval = min(m.spec.checkpoint_interval() for m in members)
    epochs_total = max(m.epochs for m in members)
    timing = {"time_model_s": sum(m.prep.time_model_s for m in members),
              "time_features_s": sum(m.prep.time_features_s for m in members), "time_report_s": 0.0}

    def member_hooks(m: _Member) -> dict[str, Any]:
        def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
            m.state = state
            final = int(metrics["epoch"]) == m.epochs
            if final:
                metrics.update(final_metrics(m.spec, m.prep, device))
                m.status, m.ended_now = FINISHED, True
            m.history.append(dict(metrics))
            m.report = {**metrics, artifacts.EPOCHS_TOTAL_KEY: m.epochs,
                        artifacts.N_CTX_EFFECTIVE_KEY: m.prep.n_ctx_effective,
                        artifacts.TEXT_SHARDING_USED_KEY: m.prep.text_sharding,
                        artifacts.WARM_HITS_KEY: m.prep.warm_hits,
                        "time_model_s": m.prep.time_model_s, "time_features_s": m.prep.time_features_s,
                        "time_train_loop_s": sum(r.get("epoch_time_s", 0.0) for r in m.history),
                        "time_eval_s": sum(r.get("val_time_s", 0.0) for r in m.history),
                        "time_report_s": timing["time_report_s"], artifacts.ENTERED_AT_KEY: entered_at,
                        "time_worker_s": time.perf_counter() - t_start}

        def should_stop(metrics: dict[str, float]) -> bool:
            if stop is None or not stop(m.mid, int(metrics["epoch"]), metrics.get("val_acc")):
                return False
            m.status, m.ended_now = STOPPED, True
            return True

        return {"on_epoch_end": on_epoch_end, "should_stop": should_stop}

    pack = [PackMember(m.prep.model, m.prep.feats.train, m.spec.train, val=m.prep.feats.val,
                       resume=m.state, **member_hooks(m)) for m in members]

    def after_epoch(epoch: int, results: Sequence[MemberResult]) -> None:
        t0 = time.perf_counter()
        for m, result in zip(members, results, strict=True):
            if result.failure and m.status == RUNNING:
                m.status, m.failure, m.ended_now = FAILED, result.failure, True
                m.report = {artifacts.FAILURE_KEY: result.failure, "epoch": len(m.history)}
        reports = {m.mid: m.report | {STATUS_KEY: m.status} for m in members if m.report}
        vals = [r["val_acc"] for r in reports.values() if "val_acc" in r and r.get("epoch") == epoch]
        report = {"epoch": epoch, artifacts.EPOCHS_TOTAL_KEY: epochs_total, MEMBERS_KEY: reports,
                  **({"val_acc": max(vals)} if vals else {}), **timing, "time_setup_s": t_setup}
        ended = any(m.ended_now for m in members)
        checkpoint = None
        if not epoch % interval or ended or epoch == epochs_total:
            for m in members:
                m.freeze(keep)
            saved = {m.mid: save for m in members if (save := m.saved()) is not None}
            checkpoint = _checkpoint_writer(saved, json.dumps({m.mid: {"status": m.status, "failure": m.failure,
                                                                       "report": m.report} for m in members}))
        rows = {}
        for m in members:
            if len(m.history) > m.reported:
                rows[m.mid], m.reported = m.history[m.reported:], len(m.history)
            m.ended_now = False
        reporter.put(_Report(report, rows, checkpoint))
        timing["time_report_s"] += time.perf_counter() - t0
        for hook in epoch_hooks:
            hook(epoch, 0)

    stopped = [j for j, m in enumerate(members) if m.status != RUNNING]
    logger.info("training a pack of %d configurations (%s) on %s", len(members), ", ".join(member_ids), device)
    for m in members:
        m.reported = len(m.history)  # a resumed member's epochs were reported before, or are in its checkpoint
    reporter = _Reporter(session)
    with keep_dir:
        try:
            train_pack(pack, after_epoch=after_epoch, stopped=stopped)
        except BaseException:
            reporter.close(raise_error=False)  # what is waiting is still reported; the pack's own error wins
            raise
        reporter.close()  # the last report, with the last checkpoint, is taken before the pack returns
