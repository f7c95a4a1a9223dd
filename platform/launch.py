"""One launch path for ``platform.train``, ``platform.tune`` and ``platform.study``: the checks before Ray starts,
then Ray's start-up, with one place for each error message.

Everything a worker would fail on minutes later is checked here first, on the driver, and a bad input is one
``error:`` line and exit status 2 (:data:`INPUT_ERRORS`), with nothing started and nothing left behind. Then Ray
starts (or is joined) while the tracking store is opened, ``--use-gpu`` is resolved against the cluster and the
folders every node must share are checked.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from platform import tracking_store
from platform.cluster_check import check_shared_paths
from platform.ray_runtime import init_ray, resolve_use_gpu
from platform.run_spec import DatasetRef, RunSpec, load_splits, load_target_splits
from urllib.parse import urlparse

import huggingface_hub.constants as hub
import open_clip

from coop_core import (
    NO_WEIGHTS,
    WeightsDownloadError,
    WeightsUnavailableError,
    check_run_inputs,
    classes_without_vectors,
    load_clip,
    resolve_model_name,
)
from coop_core.datasets import DatasetSplits, check_images_exist

logger = logging.getLogger(__name__)


def hub_unreachable_use_cache(spec: RunSpec, timeout_s: float = 5.0) -> bool:
    """Switch ``huggingface_hub`` to offline (cache-only) mode when the weights come from an unreachable Hub.

    ``huggingface_hub`` retries a failed request five times with back-off, so an offline download attempt takes about
    a minute before ``coop_core`` can say "no weights". One short TCP probe decides instead: unreachable -> offline
    mode, in which cached weights load at once and missing ones fail at once with ``WeightsUnavailableError``.

    Returns:
        True when offline mode was switched on (pass ``HF_HUB_OFFLINE=1`` to the workers too).
    """

    if spec.model.pretrained.lower() in NO_WEIGHTS or os.path.isfile(spec.model.pretrained):
        return False

    if hub.HF_HUB_OFFLINE:
        return True
    url = urlparse(hub.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return False
    except OSError:
        logger.debug("%s is unreachable: using cached pretrained weights only", url.hostname)
        hub.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub.is_offline_mode()
        return True


# What the checks before Ray starts raise for a bad input; the CLIs turn each into one `error:` line and exit 2.
INPUT_ERRORS = (ValueError, OSError, WeightsUnavailableError)


TINY_BACKBONE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-vit.json"


def offline_smoke_hint() -> str:
    """What to run without internet, as the README's Quick start says: the tests' tiny random-weight backbone (random
    weights for the real backbone would mean encoding every image with a full random ViT on the CPU, for nothing)."""
    try:
        tiny = TINY_BACKBONE.relative_to(Path.cwd())
    except ValueError:
        tiny = TINY_BACKBONE
    return (f"or, to try the platform offline, add --backbone {tiny} --pretrained none (a tiny random CLIP: a smoke "
            "run in seconds, not a result; README, Quick start)")


def check_writable_dir(path: str | Path, flag: str) -> None:
    """Prove that ``path`` can be written (or created), with a throw-away file in it or in its nearest existing
    parent; nothing is left behind.

    Raises:
        OSError: one line naming the folder, the flag and the reason (unwritable, read-only, not a folder).
    """
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".coop-write-check-"):
            pass
    except OSError as err:
        raise OSError(f"cannot write to {flag} {path} ({err.strerror or err}); pass a writable folder with {flag}"
                      ) from None


def check_inputs(spec: RunSpec, prompts: Sequence[tuple[int, str]] | None = None,
                 shots: Sequence[int | str] | None = None) -> DatasetSplits:
    """Fail fast on the driver, before Ray starts, on everything a worker would otherwise fail on minutes later.

    In order: the backbone name; the cache folder is writable; the weights (a short download, or reading the
    checkpoint file: nothing is written before they are there); the dataset loads (layout, split file); the core's
    checks of the run's inputs (``coop_core.checks.check_run_inputs``: at least two classes, each with training
    images; every shot count the run may train -- ``shots``: a sweep's grid or a study's values, default the spec's --
    against the smallest class; every prompt it may build -- ``prompts``: ``(n_ctx, ctx_init)`` pairs, default the
    spec's -- against the text context; each few-shot split, built and cached here so workers reuse it, with its
    images there and readable); the evaluation targets.

    Raises:
        One of :data:`INPUT_ERRORS`, whose message is the line to show.
    """
    model_name = resolve_model_name(spec.model.backbone)
    check_writable_dir(spec.cache_dir, "--cache-dir")
    if spec.model.pretrained.lower() not in NO_WEIGHTS:
        try:
            load_clip(spec.model.backbone, spec.model.pretrained)  # downloads into the open_clip cache, or fails fast
        except WeightsDownloadError as err:
            raise WeightsDownloadError(f"{err}; {offline_smoke_hint()}") from None
    splits = load_splits(spec, download=spec.download)
    own_prompt = (spec.prompt.n_ctx, spec.prompt.ctx_init, spec.prompt.pad_ctx_init)
    check_run_inputs(splits, tokenizer=open_clip.get_tokenizer(model_name), shots=list(shots or [spec.train.shots]),
                     prompts=list(prompts or [own_prompt]), seed=spec.train.seed, cache_dir=spec.cache_dir)
    for target in spec.eval_targets:
        check_target(spec, splits, target)
    return splits


def check_target(spec: RunSpec, splits: DatasetSplits, target: DatasetRef) -> None:
    """An evaluation target must load, have test images that exist, and (for a class-specific context) only
    classes the context will have vectors for.

    Raises:
        ValueError: naming the target and the fix.
    """

    tsplits = load_target_splits(spec, target)
    if not tsplits.test:
        raise ValueError(f"evaluation target {target.label} has no test images")
    check_images_exist(tsplits, tsplits.test)
    missing = classes_without_vectors(splits.classnames, spec.prompt.csc, tsplits.classnames)
    if missing:
        raise ValueError(f"a class-specific context (--csc) cannot be evaluated on {target.label}: "
                         f"{len(missing)} of its {len(tsplits.classnames)} classes are not among the training "
                         f"classes (first: {missing[0]!r}); use a unified context (no --csc) to transfer to new "
                         "classes")


@dataclass(frozen=True)
class Checked:
    """What the checks before Ray found: the training data, and whether the weights' Hub is unreachable (then the
    workers load cached weights only)."""

    splits: DatasetSplits
    offline: bool


def check_before_ray(spec: RunSpec, *, tracking_uri: str, storage_path: str,
                     prompts: Sequence[tuple[int, str]] | None = None,
                     shots: Sequence[int | str] | None = None) -> Checked:
    """Every check a run or sweep makes before Ray starts, in order: the tracking store answers, ``--storage-path`` is
    writable, the weights' Hub is reachable (or its cache is used), :func:`check_inputs`. The store itself is opened
    by :func:`start_ray`, while Ray starts.

    Raises:
        One of :data:`INPUT_ERRORS`, whose message is the line to show.
    """
    tracking_store.probe_tracking_store(tracking_uri)
    if "://" not in storage_path:
        check_writable_dir(storage_path, "--storage-path")
    offline = hub_unreachable_use_cache(spec)
    splits = check_inputs(spec, prompts, shots)
    return Checked(splits, offline)


def start_ray(address: str | None, *, verbose: bool, offline: bool, tracking_uri: str) -> bool:
    """Start (or join) Ray with the platform's runtime environment; ``offline`` passes the Hub's cache-only mode on
    to the workers. Returns whether this call started it (then the caller shuts it down).

    The tracking store is opened meanwhile (``tracking_store.open_store``, in a thread): importing MLflow and creating
    a new store take seconds of the driver's time, and Ray's start-up is seconds of waiting for its processes (2.4 s
    of a command saved on the 2-core development machine). The probe before Ray checked the store answers and can be
    written; what opening it still raises is raised here, once Ray is up, and a Ray this call started is stopped
    first.

    Raises:
        TrackingUnavailableError: MLflow cannot create, read or upgrade the store.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="open-tracking-store") as pool:  # waits for it on leaving
        opening = pool.submit(tracking_store.open_store, tracking_uri)
        started = init_ray(address, quiet=not verbose,
                           runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}} if offline else None)
    error = opening.exception()
    if error is not None:
        if started:
            import ray

            ray.shutdown()
        raise error
    return started


def resolve_gpus(spec: RunSpec, use_gpu: str) -> RunSpec:
    """``spec`` with ``--use-gpu`` (``auto``, ``yes``, ``no``) resolved against the running Ray cluster.

    Raises:
        ValueError: ``--use-gpu yes`` on a cluster without GPUs.
    """
    if use_gpu == "yes" and not resolve_use_gpu("auto"):
        raise ValueError("--use-gpu yes, but the Ray cluster has no GPUs; use --use-gpu no or auto")
    return dataclasses.replace(spec, use_gpu=resolve_use_gpu(use_gpu))


def warn_unshared_paths(splits: DatasetSplits, spec: RunSpec, storage_path: str) -> None:
    """Log a warning for each folder the run needs on every node that not every node of the cluster sees."""
    for warning in check_shared_paths(str(splits.image_dir), {"--storage-path": storage_path},
                                      {"--cache-dir": spec.cache_dir}):
        logger.warning("%s", warning)
