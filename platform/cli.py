"""What the CLIs share: the run flags and the spec built from them, the checks made before Ray starts, logging and
the one-line failure."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from platform.ray_runtime import USE_GPU_VALUES, resolve_use_gpu
from platform.run_spec import (
    MAX_AUTO_CHECKPOINTS,
    PLACEMENT_STRATEGIES,
    DatasetRef,
    RunSpec,
    default_cache_dir,
    default_data_root,
)
from typing import Any, NoReturn

from coop_core import get_preset, list_presets
from coop_core.config import (
    ALL_SHOTS,
    CLASS_TOKEN_POSITIONS,
    FEATURE_MODES,
    METHODS,
    PRECISIONS,
    TEXT_SHARDINGS,
    MethodConfig,
    ModelConfig,
    PromptConfig,
    TrainConfig,
)
from coop_core.datasets import CLASS_SUBSETS, DEFAULT_TEMPLATE, folder_source, list_datasets

logger = logging.getLogger(__name__)


def run_command(main: Any) -> NoReturn:
    """A CLI's ``__main__``: run ``main()`` and end the process with its status (130, and no traceback, on a Ctrl-C
    outside the training, which handles its own).

    The process ends as the interpreter would end it -- output flushed, non-daemon threads joined, logging shut
    down, ``atexit`` handlers run (Ray's shutdown, temporary folders removed) -- and then with ``os._exit``, skipping
    the interpreter's module teardown that follows: with torch, torchvision and open_clip loaded it is about 1.5 s of
    a 2-core machine's time after the command is done.
    """
    try:
        status = main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        status = 130
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code is not None and not isinstance(exit_.code, int):
            sys.stderr.write(f"{exit_.code}\n")
    threading._shutdown()  # what the interpreter does first: stop thread pools (their exit hooks), join threads
    logging.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one ``error:`` line (exit 2), like every other bad input."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_shots(value: str) -> int | str:
    """``--shots``: a positive integer, or ``all`` for every training image."""
    if value.strip().lower() == ALL_SHOTS:
        return ALL_SHOTS
    try:
        shots = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of images per class (or 'all')") from None
    if shots < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: shots must be >= 1 (or 'all')")
    return shots


def _abspath_if_exists(value: str) -> str:
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def add_run_arguments(parser: argparse.ArgumentParser, *, study: bool = False, sweep: bool = False) -> None:
    """The data, backbone, prompt, recipe and worker flags shared by ``platform.train``, ``platform.tune`` and
    ``platform.study`` (``study=True``: ``--shots`` and ``--seeds`` take several values, the study's grid; ``study``
    or ``sweep``: ``--method`` takes several, compared in one study or sweep)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, metavar="NAME|PATH", nargs="+" if study else None,
                      help=f"a dataset registry key ({', '.join(list_datasets())}) under --data-root, or a path to "
                           "your own data: a folder with one sub-folder of images per class, or a CSV/Parquet "
                           "manifest (columns path, class and/or label, optional split)"
                           + ("; several run one study each, then their average" if study else ""))
    data.add_argument("--data-root", default=default_data_root(),
                      help="folder holding <dataset>/ as in CoOp's DATASETS.md, e.g. <root>/eurosat/2750 "
                           "(default: $COOP_DATA_ROOT or ./data); must exist at this path on every Ray node")
    data.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    if not study:  # a study's --protocol base2new chooses the classes itself
        data.add_argument("--classes", default="all", choices=CLASS_SUBSETS,
                          help="train and test on all classes, or on CoCoOp's base (the first half of the sorted "
                               "labels) or new half (default: all)")
    own = parser.add_argument_group("your own data (--dataset PATH)")
    own.add_argument("--dataset-name", default=None,
                     help="the dataset's name (default: the folder's or manifest's name, lowercased); the MLflow "
                          "experiment and registered model are coop-<name>")
    own.add_argument("--template", default=None,
                     help=f"zero-shot prompt template with one {{}} for the class name (default: {DEFAULT_TEMPLATE!r})")
    own.add_argument("--classnames-file", default=None,
                     help="readable class names: a JSON object {folder: name} or '<folder> <name>' lines "
                          "(default: the folder names, underscores as spaces)")
    own.add_argument("--split-file", default=None,
                     help="a CoOp-format split JSON ({train|val|test: [[relpath, label, classname], ...]}, paths "
                          "relative to the folder); default: the manifest's split column, else a deterministic "
                          "stratified 50/20/30 split written once under --cache-dir")
    own.add_argument("--split-seed", type=int, default=1, help="seed of that split (default: 1)")
    if study:
        data.add_argument("--shots", type=parse_shots, nargs="+", default=[1, 2, 4, 8, 16],
                          help="the shot counts to train (default: 1 2 4 8 16, CoOp's curve)")
        data.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                          help="the seeds of every shot count: few-shot sampling and context initialisation "
                               "(default: 1 2 3, as the paper averages)")
    else:
        data.add_argument("--shots", type=parse_shots, default=16,
                          help="training images per class (default: 16); more than the smallest class has is an "
                               "error, 'all' trains on every training image")
        data.add_argument("--seed", type=int, default=1,
                          help="few-shot sampling and initialisation seed (default: 1)")
    data.add_argument("--max-test-items", type=int, default=None,
                      help="evaluate on a class-balanced subset of this many test items (quick runs; default: all)")
    data.add_argument("--cache-dir", default=default_cache_dir(),
                      help="feature/few-shot cache shared by all workers and trials (default: $COOP_CACHE_DIR, "
                           "~/.cache/coop, or ./.cache/coop)")
    data.add_argument("--preset", default=None, metavar="NAME",
                      help="start from one of the papers' configurations (backbone, prompt, recipe; see README, "
                           f"Reproducing the paper): {', '.join(list_presets())}; flags given explicitly win")
    model = parser.add_argument_group("backbone")
    model.add_argument("--backbone", default="ViT-B-16",
                       help="open_clip architecture (ViT-B-16, RN50, ...) or a path to an open_clip model-config JSON")
    model.add_argument("--pretrained", default="openai",
                       help="open_clip pretrained tag (needs internet once), a local checkpoint path, or 'none' "
                            "for random weights (offline smoke runs)")
    prompt = parser.add_argument_group("prompt")
    prompt.add_argument("--n-ctx", type=int, default=16, help="number of learnable context vectors (default: 16)")
    prompt.add_argument("--ctx-init", default="",
                        help="initialise the context from these words, e.g. 'a photo of a' (overrides --n-ctx)")
    prompt.add_argument("--class-token-position", default="end", choices=CLASS_TOKEN_POSITIONS,
                        help="class name after (end), inside (middle) or before (front) the context")
    prompt.add_argument("--csc", action="store_true", help="class-specific context instead of one shared context")
    prompt.add_argument("--pad-ctx-init", action="store_true",
                        help="keep --n-ctx when --ctx-init is shorter: its words fill the last slots, zeros before "
                             "(ProGrad's initialisation)")
    method = parser.add_argument_group("method")
    several = study or sweep
    method.add_argument("--method", default=["coop"] if several else "coop", choices=METHODS,
                        nargs="+" if several else None,
                        help="the prompt learner: coop; kgcoop (pulls the text features toward the hand-crafted "
                             "prompt's); prograd (the gradient projected off its conflict with zero-shot CLIP); "
                             "cocoop (the context shifted per image by a meta-net)"
                             + ("; several compare the methods in one table" if study else "")
                             + ("; several make the method a searched dimension (with --grid: a grid one)"
                                if sweep else "") + " (default: coop)")
    method.add_argument("--kg-weight", type=float, default=8.0,
                        help="KgCoOp's weight of its text-feature term (default: 8.0, its base-to-new setting)")
    method.add_argument("--prograd-lambda", type=float, default=1.0,
                        help="ProGrad's lambda: how much of the conflicting gradient component is removed "
                             "(default: 1.0)")
    method.add_argument("--prograd-temperature", type=float, default=1.0,
                        help="ProGrad's distillation temperature (default: 1.0)")
    method.add_argument("--meta-net-ratio", type=int, default=16,
                        help="CoCoOp's meta-net bottleneck: embed_dim -> embed_dim // ratio -> width (default: 16)")
    recipe = parser.add_argument_group("training recipe")
    recipe.add_argument("--epochs", type=int, default=None,
                        help="epochs (default: CoOp's schedule: 1 shot 50, 2-4 shots 100, 8-16 shots 200)")
    recipe.add_argument("--lr", type=float, default=0.002, help="SGD learning rate (default: 0.002)")
    recipe.add_argument("--warmup-epochs", type=int, default=1,
                        help="epochs at a constant 1e-5 before the cosine schedule (default: 1)")
    recipe.add_argument("--batch-size", type=int, default=32,
                        help="GLOBAL batch size, split across workers (default: 32)")
    recipe.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32, bf16 autocast, or amp (fp16 + loss scaling, GPUs only)")
    recipe.add_argument("--feature-mode", default="cached", choices=FEATURE_MODES,
                        help="cached: train on pre-computed augmented views; exact: encode fresh augmentations "
                             "every step (reference compute, much slower)")
    recipe.add_argument("--n-views", type=int, default=10, help="augmented views per image in cached mode")
    recipe.add_argument("--loader-workers", type=int, default=0,
                        help="DataLoader processes per worker for feature extraction (default: 0)")
    workers = parser.add_argument_group("workers")
    workers.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP processes; default: 1)")
    workers.add_argument("--use-gpu", default="auto", choices=USE_GPU_VALUES,
                         help="one GPU per worker: auto = if the Ray cluster has GPUs (default: auto)")
    workers.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: 1)")
    workers.add_argument("--text-sharding", default="auto", choices=TEXT_SHARDINGS,
                         help="how a multi-worker run splits the text step: data = every worker encodes every class "
                              "prompt; class = each encodes its share of the classes (for many-class datasets, e.g. "
                              "ImageNet); auto = class when the text step's activations outweigh the model (default)")
    workers.add_argument("--checkpoint-every", type=int, default=None, metavar="EPOCHS",
                         help="epochs between checkpoints (default: every epoch for runs of up to "
                              f"{MAX_AUTO_CHECKPOINTS} epochs, else about {MAX_AUTO_CHECKPOINTS} per run; the last "
                              "epoch always has one); a restarted run resumes from the last one")
    workers.add_argument("--placement-strategy", default="PACK", choices=PLACEMENT_STRATEGIES,
                         help="where a run's workers go: PACK on as few nodes as fit (fastest all-reduce; default), "
                              "SPREAD on different nodes where possible; STRICT_* fail rather than fall back")


def preset_defaults(name: str) -> dict[str, Any]:
    """The flag defaults a ``--preset`` sets (argparse destinations: ``backbone``, ``n_ctx``, ``lr``, ...).

    Raises:
        ValueError: an unknown preset (the message lists them).
    """
    preset = get_preset(name)
    return {"backbone": preset.model.backbone, "pretrained": preset.model.pretrained,
            "n_ctx": preset.prompt.n_ctx, "ctx_init": preset.prompt.ctx_init, "csc": preset.prompt.csc,
            "class_token_position": preset.prompt.class_token_position, "pad_ctx_init": preset.prompt.pad_ctx_init,
            "method": preset.method.name, "kg_weight": preset.method.kg_weight,
            "prograd_lambda": preset.method.prograd_lambda, "prograd_temperature": preset.method.prograd_temperature,
            "meta_net_ratio": preset.method.meta_net_ratio, **dict(preset.train)}


def parse_run_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a CLI's flags with ``--preset`` applied first: the preset's values become the defaults, so every flag
    given explicitly still wins. An unknown preset is a usage error (exit 2, one line)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None:
        try:
            defaults = preset_defaults(known.preset)
        except ValueError as err:
            parser.error(f"argument --preset: {err}")
        if isinstance(parser.get_default("method"), list):  # a sweep's or study's --method takes several
            defaults["method"] = [defaults["method"]]
        parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def dataset_ref(value: str, *, classes: str = "all", name: str | None = None, template: str | None = None,
                classnames_file: str | None = None, split_file: str | None = None, split_seed: int = 1
                ) -> DatasetRef:
    """``--dataset`` as a :class:`DatasetRef`: a registry key, else a path to the user's folder or manifest.

    Raises:
        ValueError: neither a registry key nor an existing path, or an option that only a path takes.
    """
    own = {"--dataset-name": name, "--template": template, "--classnames-file": classnames_file,
           "--split-file": split_file}
    if value in list_datasets():
        given = [flag for flag, v in own.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to your own data "
                             f"(--dataset PATH), not to the built-in dataset {value!r}")
        return DatasetRef(value, classes=classes)
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"dataset {value!r} is neither a built-in dataset ({', '.join(list_datasets())}) nor an "
                         "existing folder or manifest file; pass a registry key, or the path to your images (a folder "
                         "with one sub-folder per class, or a CSV/Parquet manifest)")
    source = folder_source(path, name=name, template=template, classnames_file=classnames_file,
                           split_file=split_file, split_seed=split_seed)
    return DatasetRef(source.name, source, classes)


def dataset_ref_from_args(args: argparse.Namespace, value: str | None = None, *, classes: str | None = None
                          ) -> DatasetRef:
    """:func:`dataset_ref` of ``value`` (default ``args.dataset``) with the data flags of ``args``; ``classes``
    (default ``args.classes``, else all) is the class subset."""
    classes = getattr(args, "classes", "all") if classes is None else classes
    return dataset_ref(args.dataset if value is None else value, classes=classes,
                       name=args.dataset_name, template=args.template, classnames_file=args.classnames_file,
                       split_file=args.split_file, split_seed=args.split_seed)


def method_from_args(args: argparse.Namespace, name: str | None = None) -> MethodConfig:
    """The ``--method`` flags as a :class:`MethodConfig` (``name``: one of a study's ``--method`` values)."""
    name = name if name is not None else args.method
    if isinstance(name, list):  # a sweep's or study's several --method values: the run's own is the first
        name = name[0]
    return MethodConfig(name=name, kg_weight=args.kg_weight, prograd_lambda=args.prograd_lambda,
                        prograd_temperature=args.prograd_temperature, meta_net_ratio=args.meta_net_ratio)


def spec_from_args(args: argparse.Namespace, *, use_gpu: bool | None = None, ref: DatasetRef | None = None,
                   shots: int | str | None = None, seed: int | None = None, method: str | None = None) -> RunSpec:
    """Build a :class:`RunSpec` from :func:`add_run_arguments` flags; paths are made absolute for the workers.

    Args:
        args: parsed flags.
        use_gpu: the resolved ``--use-gpu`` (pass ``resolve_use_gpu(args.use_gpu)`` after :func:`init_ray`); None
            resolves it now.
        ref, shots, seed, method: the dataset, shot count, seed and method when the flags hold several (a study's
            ``--dataset``, ``--shots``, ``--seeds`` and ``--method``); default ``args.dataset``, ``args.shots``,
            ``args.seed``, ``args.method``.

    Raises:
        ValueError: invalid values (the message names the flag's field and what is allowed).
    """
    if use_gpu is None:
        use_gpu = resolve_use_gpu(args.use_gpu)
    ref = dataset_ref_from_args(args) if ref is None else ref
    shots = args.shots if shots is None else shots
    seed = args.seed if seed is None else seed
    return RunSpec(
        dataset=ref.name,
        source=ref.source,
        classes=ref.classes,
        data_root=str(Path(args.data_root).expanduser().resolve()),
        model=ModelConfig(backbone=_abspath_if_exists(args.backbone), pretrained=_abspath_if_exists(args.pretrained)),
        prompt=PromptConfig(n_ctx=args.n_ctx, ctx_init=args.ctx_init, csc=args.csc,
                            class_token_position=args.class_token_position, pad_ctx_init=args.pad_ctx_init),
        method=method_from_args(args, method),
        train=TrainConfig(shots=shots, seed=seed, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, warmup_epochs=args.warmup_epochs, precision=args.precision,
                          feature_mode=args.feature_mode, n_views=args.n_views, loader_workers=args.loader_workers,
                          text_sharding=args.text_sharding),
        num_workers=args.num_workers,
        use_gpu=use_gpu,
        cache_dir=str(Path(args.cache_dir).expanduser().resolve()),
        max_test_items=args.max_test_items,
        cpus_per_worker=args.cpus_per_worker,
        placement_strategy=args.placement_strategy,
        download=args.download,
        checkpoint_every=args.checkpoint_every,
    )


def add_infra_arguments(parser: argparse.ArgumentParser) -> None:
    """Ray cluster, storage and MLflow flags (shared with ``platform.tune``)."""
    infra = parser.add_argument_group("cluster and tracking")
    infra.add_argument("--ray-address", default=None,
                       help="Ray cluster to join (e.g. 'auto' on a cluster node); default: start a local Ray")
    infra.add_argument("--storage-path", default=str(Path("ray_results").resolve()),
                       help="where Ray Train keeps checkpoints; a shared path or s3:// on multi-node clusters "
                            "(default: ./ray_results)")
    infra.add_argument("--tracking-uri", default=None,
                       help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    infra.add_argument("--experiment", default=None, help="MLflow experiment (default: coop-<dataset>)")
    infra.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    infra.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the libraries' INFO logs")

class StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted.

    A plain ``StreamHandler(sys.stderr)`` keeps the stream of the moment it was made; when the CLI's ``main`` runs more
    than once in a process (tests, notebooks) that stream may since have been replaced and closed.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool) -> None:
    """Our progress on stderr; other libraries' INFO only with --verbose (their warnings reach stderr anyway)."""
    if not verbose:
        # MLflow draws a progress bar for every artifact it downloads (a checkpoint file, a table) and logs its
        # database set-up at INFO; both documented switches, read when mlflow is imported or downloads.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    for name in ("platform", "coop_core"):
        lg = logging.getLogger(name)
        if not any(isinstance(h, StderrHandler) for h in lg.handlers):
            lg.addHandler(StderrHandler())
        lg.setLevel(logging.INFO)
        lg.propagate = False
    if verbose and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


def fail(message: str) -> int:
    """Print ``error: <message>`` as one line on stderr and return the bad-input exit status, 2."""
    sys.stderr.write(f"error: {message}\n")
    return 2
