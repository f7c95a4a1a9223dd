"""The training function every run executes, whichever Ray API runs it: :func:`run_training`.

It is plain ``coop_core`` (load CLIP, the splits, the few-shot split and the image features; build the model; run
``coop_core.engine.train``; evaluate the last epoch on the test split and zero-shot; save the prompts) plus a
:class:`Session`, the one object that talks to Ray. Two sessions exist:

- ``RaySession("train")`` inside a Ray Train worker (:func:`train_loop_per_worker`, run by ``platform.train`` and by
  multi-worker sweep trials): DDP over the workers' ``torch.distributed`` group, rank 0 carries the checkpoint.
- ``RaySession("tune")`` inside a Ray Tune trial's own process (single-worker sweep trials, ``platform/trials.py``):
  ``ray.tune.report`` per epoch, no Ray Train controller or worker group at all.

Every epoch's report carries the epoch metrics, the cumulative time spent per phase (``WORKER_TIMING_KEYS``) and, at
the last epoch, the final checkpoint with the learned prompts (``platform/artifacts.py`` owns the files and keys).
A restarted run resumes from the session's last checkpoint with the same context, optimiser, scheduler and RNG.

Loading goes through the process's warm cache (``platform/process_cache.py``), so a process that runs several
trials loads CLIP and the features once; whatever a trial changes is built fresh here, per trial.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from platform import artifacts
from platform.distributed import TorchDistributed
from platform.process_cache import model_key, process_cache
from platform.progress import ProgressFn, board_reporter
from platform.run_spec import DatasetRef, RunSpec, load_splits, load_target_splits
from typing import Any, Protocol

import torch

from coop_core import (
    Distributed,
    NonFiniteLossError,
    PromptMeta,
    SingleProcess,
    TrainState,
    build_few_shot,
    build_model,
    build_objective,
    evaluate,
    evaluate_final,
    evaluation_features,
    load_clip,
    nearest_words,
    nearest_words_table,
    prepare_features,
    prompt_model,
    save_prompts,
    text_sharding_for,
    text_tower,
    train,
    weights_digest,
    zeroshot_evaluate,
)
from coop_core.datasets import DatasetSplits

logger = logging.getLogger(__name__)

# Called after each epoch's report with (epoch, rank): a seam for callers (tests inject faults through it).
EpochHook = Callable[[int, int], None]

_TRIALS_IN_PROCESS = 0  # how many runs this process has started (0 before the first: a fresh process)


class Session(Protocol):
    """What :func:`run_training` needs from the Ray API that runs it."""

    def restored(self) -> tuple[TrainState, list[dict[str, Any]]] | None:
        """The state and history of the checkpoint to resume from, if the run was restarted."""
        ...

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None) -> None:
        """Report an epoch's metrics, with the checkpoint folder written for it (None on ranks that write none)."""
        ...


def _restore(checkpoint: Any) -> tuple[TrainState, list[dict[str, Any]]] | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        artifacts.verify(d)
        return artifacts.read_train_state(d), artifacts.read_history(d)


class RaySession:
    """A Ray session: Ray Train's inside a Train worker (``api="train"``), Ray Tune's inside a function trainable
    (``api="tune"``). Both report with ``report(metrics, checkpoint=...)`` and resume from ``get_checkpoint()``."""

    def __init__(self, api: str) -> None:
        if api not in ("train", "tune"):
            raise ValueError(f"api must be 'train' or 'tune', got {api!r}")
        self.api = api

    def _module(self) -> Any:
        import importlib

        return importlib.import_module(f"ray.{self.api}")

    def restored(self) -> tuple[TrainState, list[dict[str, Any]]] | None:
        return _restore(self._module().get_checkpoint())

    def checkpoint(self) -> Any:
        """The raw checkpoint to resume from (a packed trial's folder of member checkpoints), or None."""
        return self._module().get_checkpoint()

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None) -> None:
        ray_api = self._module()
        checkpoint = ray_api.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        ray_api.report(dict(metrics), checkpoint=checkpoint)


def _process_created_at() -> float | None:
    """Wall-clock start of this process when it has not run a trial before (Linux ``/proc``); else None."""
    if _TRIALS_IN_PROCESS:
        return None
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _format_epoch(metrics: Mapping[str, float], epochs: int) -> str:
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}", f"loss {metrics['train_loss']:.4f}",
             f"train_acc {metrics['train_acc']:.2f}", f"lr {metrics['lr']:.3g}"]
    if "val_acc" in metrics:
        parts.append(f"val_acc {metrics['val_acc']:.2f}")
    if "test_acc" in metrics:
        parts.append(f"test_acc {metrics['test_acc']:.2f}")
    parts.append(f"{metrics['epoch_time_s']:.2f}s")
    return " | ".join(parts)


def run_training(spec: RunSpec, session: Session, *, dist: Distributed | None = None,
                 device: torch.device | str = "cpu", epoch_hooks: Sequence[EpochHook] = (),
                 log_epochs: bool = True, progress: ProgressFn | None = None) -> None:
    """Train ``spec`` to its last epoch, reporting every epoch to ``session`` (see the module docstring).

    A run that diverges (NaN or infinite loss) ends with one more report carrying ``artifacts.FAILURE_KEY`` (the
    reason) instead of raising: the caller marks it failed, and no retry repeats the divergence.

    Args:
        spec: the run.
        session: how this process reports and resumes (a :class:`RaySession`, or a test's own).
        dist: the process group (a one-process run by default); rank 0 writes the checkpoints.
        device: where the model and features live.
        epoch_hooks: called after each epoch's report with ``(epoch, rank)``.
        log_epochs: log one progress line per epoch (rank 0).
        progress: ``progress(task, done, total)`` for the driver's bars (rank 0): ``features`` in images while they
            are encoded, ``epochs`` after each epoch (``platform/progress.py``).
    """
    global _TRIALS_IN_PROCESS
    entered_at = time.time()
    process_created_at = _process_created_at()
    _TRIALS_IN_PROCESS += 1
    t_start = time.perf_counter()
    dist = dist or SingleProcess()
    rank = dist.rank
    device = torch.device(device)
    cfg = spec.train
    epochs = cfg.resolved_epochs
    checkpoint_interval = spec.checkpoint_interval()
    torch.manual_seed(cfg.seed)  # nothing below draws from it, but no trial may inherit the previous one's RNG

    progress = progress if rank == 0 else None
    prep = prepare_run(spec, device, dist, progress)
    clip, splits, fewshot, feats, model = prep.clip, prep.splits, prep.fewshot, prep.feats, prep.model

    resume, history = None, []
    restored = session.restored()
    if restored is not None:
        resume, history = restored
        history = [row for row in history if row["epoch"] <= resume.epoch]
        logger.info("resuming from the checkpoint after epoch %d/%d", resume.epoch, epochs)
    elif rank == 0:
        logger.info("training %s: %d-shot, %d epochs, %d worker(s) on %s, %d train / %d val / %d test items",
                    spec.dataset, cfg.shots, epochs, dist.world_size, device, len(fewshot.train), len(fewshot.val),
                    len(splits.test))

    resolved = prep.resolved | {"resumed_from_epoch": resume.epoch if resume is not None else None}
    timing = {"time_model_s": prep.time_model_s, "time_features_s": prep.time_features_s,
              "time_train_loop_s": sum(row.get("epoch_time_s", 0.0) for row in history),
              "time_eval_s": sum(row.get("val_time_s", 0.0) for row in history), "time_report_s": 0.0}
    fixed = {artifacts.N_CTX_EFFECTIVE_KEY: prep.n_ctx_effective, artifacts.TEXT_SHARDING_USED_KEY: prep.text_sharding,
             artifacts.ENTERED_AT_KEY: entered_at, artifacts.EPOCHS_TOTAL_KEY: epochs,
             artifacts.WARM_HITS_KEY: prep.warm_hits}
    if process_created_at is not None:
        fixed[artifacts.PROCESS_CREATED_AT_KEY] = process_created_at

    def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
        timing["time_train_loop_s"] += metrics["epoch_time_s"]
        timing["time_eval_s"] += metrics.get("val_time_s", 0.0)
        final = int(metrics["epoch"]) == epochs
        if final and rank == 0:
            t_eval = time.perf_counter()
            metrics.update(final_metrics(spec, prep, device))
            timing["time_eval_s"] += time.perf_counter() - t_eval
        history.append(dict(metrics))
        t_report = time.perf_counter()
        report = {**metrics, **fixed, **timing, "time_worker_s": t_report - t_start}
        if rank != 0:
            session.report(report, None)  # every worker reports; only rank 0 carries the checkpoint
        elif not final and int(metrics["epoch"]) % checkpoint_interval:
            session.report(report, None)  # metrics every epoch (ASHA, MLflow); a checkpoint every interval
        else:
            with tempfile.TemporaryDirectory() as tmp:
                d = Path(tmp)
                artifacts.write_checkpoint(d, state, history, resolved)
                if final:
                    write_final_artifacts(d, spec, clip, splits, model, report)
                artifacts.seal(d)
                session.report(report, d)
        if rank == 0 and log_epochs:
            logger.info("%s", _format_epoch(metrics, epochs))
        if rank == 0 and progress is not None:
            progress("epochs", int(metrics["epoch"]), epochs)
        timing["time_report_s"] += time.perf_counter() - t_report
        for hook in epoch_hooks:
            hook(int(metrics["epoch"]), rank)

    try:
        train(model, feats.train, cfg, val=feats.val, dist=dist, on_epoch_end=on_epoch_end, resume=resume,
              objective=prep.objective)
    except NonFiniteLossError as err:  # every rank raises at the same step; each reports, so none is left waiting
        last = int(history[-1]["epoch"]) if history else 0
        report = {artifacts.FAILURE_KEY: str(err), "epoch": last}
        if rank != 0:
            session.report(report, None)
            return
        logger.error("%s", err)
        with tempfile.TemporaryDirectory() as tmp:
            artifacts.write_failure(Path(tmp), str(err), history, resolved)
            artifacts.seal(Path(tmp))
            session.report(report, Path(tmp))


@dataclasses.dataclass
class PreparedRun:
    """What a run trains with, loaded through the process's warm cache: CLIP, the splits, the few-shot split, the
    image features, the method's model and objective, and the run's resolved config (``config.json``) before it knows
    whether it resumed."""

    clip: Any
    mkey: Any
    splits: DatasetSplits
    fewshot: Any
    feats: Any
    model: Any
    objective: Any
    n_ctx_effective: int
    text_sharding: str
    resolved: dict[str, Any]
    warm_hits: int
    time_model_s: float
    time_features_s: float


def prepare_run(spec: RunSpec, device: torch.device, dist: Distributed, progress: ProgressFn | None) -> PreparedRun:
    """Load (or take from the warm cache) what ``spec`` trains with on ``device``, and build its model."""
    t_start = time.perf_counter()
    rank, cfg = dist.rank, spec.train
    cache = process_cache()
    mkey = model_key(spec.model.backbone, spec.model.pretrained, device)
    clip, hit_model = cache.model(mkey, lambda: load_clip(spec.model.backbone, spec.model.pretrained, device=device))
    t_model = time.perf_counter()
    data_key = _data_key(spec)
    splits, hit_splits = cache.small(("splits", *data_key), lambda: load_splits(spec))
    fewshot, _ = cache.small(("fewshot", *data_key, cfg.shots, cfg.seed),
                             lambda: build_few_shot(splits, cfg.shots, cfg.seed, spec.cache_dir))
    with_test = rank == 0
    feature_key = (mkey, *data_key, cfg.shots, cfg.seed, cfg.feature_mode, cfg.n_views, with_test)
    if cfg.feature_mode == "exact":  # an on-the-fly image source holds a dataset and RNG use: never shared
        feats, hit_feats = prepare_features(clip, splits, fewshot, cfg, cache_dir=spec.cache_dir, device=device,
                                            with_test=with_test, progress=progress), False
    else:
        feats, hit_feats = cache.features(feature_key, lambda: prepare_features(
            clip, splits, fewshot, cfg, cache_dir=spec.cache_dir, device=device, with_test=with_test,
            progress=progress))
    model = build_model(clip, splits.classnames, spec.prompt, cfg.seed, device, method=spec.method)
    objective = build_objective(spec.method, model, clip, splits.template)
    n_ctx_effective = model.prompt_learner.ctx.shape[-2]
    text_sharding = text_sharding_for(cfg.text_sharding, model, dist).name  # what engine.train will use
    t_setup = time.perf_counter()

    resolved = spec.resolved_config() | {
        "world_size": dist.world_size, "classnames": list(splits.classnames), "template": splits.template,
        "n_train": len(fewshot.train), "n_val": len(fewshot.val), "n_test": len(splits.test),
        artifacts.N_CTX_EFFECTIVE_KEY: n_ctx_effective, artifacts.TEXT_SHARDING_USED_KEY: text_sharding,
        "split": splits.split_source,  # the split file (or how the split was made) the run used
        "fewshot_manifest": str(fewshot.manifest_path) if fewshot.manifest_path else None,
        "skipped_images": dict(feats.skipped),  # undecodable images left out, per split
    }
    if rank == 0:  # what the registry's champion rule checks before it compares two runs (artifacts.REGISTRY_METRIC)
        resolved[artifacts.REGISTRY_SET_KEY] = feats.registry_set
        resolved[artifacts.WEIGHTS_DIGEST_KEY] = cache.small(("weights_digest", mkey),
                                                             lambda: weights_digest(clip.model))[0]
    return PreparedRun(clip, mkey, splits, fewshot, feats, model, objective, n_ctx_effective, text_sharding, resolved,
                       int(hit_model) + int(hit_splits) + int(hit_feats), t_model - t_start, t_setup - t_model)


def _data_key(spec: RunSpec) -> tuple[str, str, int | None]:
    """What a run's splits (and test split) are cached under in the warm process cache."""
    return json.dumps(spec.data_ref.to_dict(), sort_keys=True), spec.data_root, spec.max_test_items


def final_metrics(spec: RunSpec, prep: PreparedRun, device: torch.device) -> dict[str, float]:
    """The last epoch's measures (rank 0): test and zero-shot accuracy, the registry set's accuracy, and every
    evaluation target's (``target/<label>/...``), as ``coop_core.run_coop`` measures them. Zero-shot CLIP's result is
    the same for every run on the same CLIP and test split: measured once per process (a pack's members, the warm
    trials of a sweep) and then taken from the warm cache."""
    splits, feats = prep.splits, prep.feats

    def zeroshot() -> dict[str, float]:
        return process_cache().small(("zeroshot", prep.mkey, *_data_key(spec)), lambda: zeroshot_evaluate(
            prep.clip.model, prep.clip.tokenizer, splits.classnames, splits.template, feats.test))[0]

    done = evaluate_final(prep.model, prep.clip, prep.splits, prep.feats, spec.train.precision, zeroshot=zeroshot)
    metrics = {"test_acc": done.test["acc"], "test_macro_f1": done.test["macro_f1"],
               "zeroshot_test_acc": done.zeroshot_test["acc"], "zeroshot_test_macro_f1": done.zeroshot_test["macro_f1"]}
    if done.registry is not None:
        metrics[artifacts.REGISTRY_METRIC] = done.registry["acc"]
    for target in spec.eval_targets:
        metrics.update(_evaluate_target(spec, target, prep.clip, prep.mkey, prep.model, prep.splits.classnames,
                                        device))
    return metrics


def _evaluate_target(spec: RunSpec, target: DatasetRef, clip: Any, mkey: Any, model: Any,
                     classnames: Sequence[str], device: torch.device) -> dict[str, float]:
    """The learned prompts and zero-shot CLIP on an evaluation target's test split, as ``target/<label>/...``."""
    cache = process_cache()
    key = (json.dumps(target.to_dict(), sort_keys=True), spec.data_root, spec.max_test_items)
    tsplits, _ = cache.small(("splits", *key), lambda: load_target_splits(spec, target))
    feats, _ = cache.features((mkey, "target", *key), lambda: evaluation_features(
        clip, tsplits, "test", cache_dir=spec.cache_dir, device=device, loader_workers=spec.train.loader_workers)[0])
    target_model = prompt_model(clip, model.prompt_learner.ctx.detach(), spec.prompt, classnames,
                                tsplits.classnames, device, method=spec.method, learned=model.learned_state())
    coop = evaluate(target_model, feats, spec.train.precision)
    zs = zeroshot_evaluate(clip.model, clip.tokenizer, tsplits.classnames, tsplits.template, feats)
    values = {"test_acc": coop["acc"], "test_macro_f1": coop["macro_f1"], "zeroshot_test_acc": zs["acc"],
              "zeroshot_test_macro_f1": zs["macro_f1"], "n_test": float(len(feats.labels))}
    logger.info("%s: CoOp %.2f %%, zero-shot %.2f %% on %d test images", target.label, coop["acc"], zs["acc"],
                len(feats.labels))
    return {artifacts.target_key(target.label, k): v for k, v in values.items()}


def write_final_artifacts(d: Path, spec: RunSpec, clip: Any, splits: DatasetSplits, model: Any,
                           metrics: Mapping[str, Any]) -> None:
    """The learned prompts (+ JSON), the nearest-words table and the final metrics, next to the last state."""
    ctx = model.prompt_learner.ctx.detach().cpu()
    prompt = dataclasses.replace(spec.prompt, n_ctx=ctx.shape[-2])  # ctx_init's word count wins (unless padded)
    extra = {"dataset": spec.dataset, "shots": str(spec.train.shots), "seed": str(spec.train.seed),
             "model_name": clip.model_name, "template": splits.template,
             **{k: f"{metrics[k]:.4f}" for k in ("val_acc", "test_acc", "zeroshot_test_acc") if k in metrics}}
    meta = PromptMeta(backbone=spec.model.backbone, pretrained=spec.model.pretrained, classnames=splits.classnames,
                      prompt=prompt, extra=extra, method=spec.method, learned=model.learned_state())
    save_prompts(d / artifacts.PROMPTS_FILE, ctx, meta)
    words = nearest_words(ctx, text_tower(clip.model).token_embedding, clip.tokenizer)
    (d / artifacts.NEAREST_WORDS_FILE).write_text(nearest_words_table(words, list(splits.classnames)) + "\n")
    artifacts.write_final_metrics(d, metrics)


def configure_worker_logging(rank: int, level: str, *, progress_lines: bool = True) -> None:
    """Rank 0 prints its progress lines to stderr (Ray forwards worker stderr to the driver's console); other ranks
    and chatty libraries (open_clip logs through the root logger) only show warnings unless ``level`` is lower.

    ``progress_lines=False`` (a sweep's trials, whose driver tells each trial's story itself) keeps rank 0 at
    ``level`` too, so the console is not doubled by every trial's loading and caching lines.
    """
    logging.getLogger().setLevel(level)
    for name in ("platform", "coop_core"):
        lg = logging.getLogger(name)
        if rank == 0 and not any(getattr(h, "_coop_worker", False) for h in lg.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler._coop_worker = True  # type: ignore[attr-defined]
            lg.addHandler(handler)
            lg.propagate = False
        lg.setLevel(logging.INFO if rank == 0 and progress_lines else level)
    logging.getLogger("coop_core.engine").setLevel(logging.WARNING)  # rank 0 prints its own epoch line
    for name in ("ray.train", "ray.tune"):  # "Checkpoint successfully created at ..." for every epoch of every trial
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: one shard of a CoOp run, DDP over the worker group.

    Args:
        config: ``{"spec": RunSpec.to_dict()}``, plus optional ``"log_level"``, ``"epoch_hooks"`` (see
            :func:`run_training`) and ``"progress_board"`` (the driver's ``platform.progress.ProgressBoard``, when it
            draws bars).
    """
    spec = RunSpec.from_dict(config["spec"])
    dist = TorchDistributed.from_ray_train()  # (1) Ray: rank and world size of the torch process group
    configure_worker_logging(dist.rank, config.get("log_level", "WARNING"))
    if spec.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()  # (2) Ray: this worker's GPU
    else:
        device = torch.device("cpu")
    # (3) Ray: the session reports each epoch (and resumes from the last checkpoint after a failure)
    run_training(spec, RaySession("train"), dist=dist, device=device, epoch_hooks=config.get("epoch_hooks", ()),
                 progress=board_reporter(config.get("progress_board")))

