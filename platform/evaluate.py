"""Evaluate learned prompts on any dataset or split:
``python -m platform.evaluate --model models:/coop-imagenet@champion --dataset imagenet_sketch``.

The prompts come from a registered model (``models:/<name>@<alias>`` or ``models:/<name>/<version>``), an MLflow run
id (a trial's or a ``platform.train`` run's ``prompts/`` artifact), or a ``prompts.safetensors`` file (or a checkpoint
folder holding one). Their file says which backbone and weights they were learned with, and for which class names.
The target is a registry dataset under ``--data-root`` or your own folder / manifest (``--dataset PATH``), with
``--classes base|new|all`` and ``--split``:

- a unified context (one for all classes) transfers to any class list;
- a class-specific (CSC) context transfers to a subset of the classes it was learned for, matched by class name
  (ImageNet-A and -R are 200-class subsets of ImageNet's 1,000); any other class list is refused in one line.

Zero-shot CLIP with the target's hand-crafted template is measured on the same images beside it. The result is an
MLflow run in the target's experiment (``coop-<target>``), tagged with and linked to the run the prompts came from.
This runs in the calling process (on a GPU when there is one), not on Ray: one forward pass per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from platform import artifacts, tracking
from platform.cli import Parser, configure_logging, dataset_ref_from_args, fail
from platform.launch import INPUT_ERRORS, check_writable_dir
from platform.progress import bars_wanted
from platform.registry import PROMPTS_SHA256_KEY, record_measurement
from platform.run_spec import DatasetRef, default_cache_dir, default_data_root, subset_test_items
from platform.tracking_store import limit_http_retries, probe_tracking_store
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from coop_core import (
    PromptFileError,
    PromptTransferError,
    WeightsUnavailableError,
    evaluate,
    evaluation_features,
    load_clip,
    load_prompts,
    prompt_digest,
    prompt_model,
    verified_digest,
    weights_digest,
    zeroshot_evaluate,
)
from coop_core import check_transfer as check_classes
from coop_core.atomic import atomic_write_bytes
from coop_core.datasets import CLASS_SUBSETS, check_images_exist
from coop_core.features import items_digest
from coop_core.fewshot import registry_eval_items

logger = logging.getLogger(__name__)

MODEL_URI_RE = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
RUN_ID_RE = re.compile(r"[0-9a-f]{32}")
SPLITS = ("test", "val", "train", "registry")  # registry: the dataset's registry evaluation set (of val)


class _FeatureBar:
    """The image-features bar at a terminal (this CLI runs in one process, so it draws directly)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self._bar = enabled, None

    def __enter__(self) -> _FeatureBar:
        return self

    def update(self, task: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc="image features", unit="img", file=sys.stderr, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass(frozen=True)
class PromptSource:
    """Where evaluated prompts came from: the file, and the MLflow run / registered version it belongs to."""

    path: Path
    description: str  # what the user passed, in words (``models:/coop-eurosat@champion (v3)``, a run id, a path)
    run_id: str | None = None
    model_uri: str | None = None
    version: str | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m platform.evaluate",
        description="Evaluate learned CoOp prompts on a dataset or split (another dataset, a domain-shifted "
                    "variant, the new classes of a base-to-new split, your own images) beside zero-shot CLIP, and "
                    "log the result to MLflow linked to the run the prompts came from.",
        epilog="Examples: python -m platform.evaluate --model models:/coop-imagenet@champion --dataset "
               "imagenet_sketch --data-root DATA\n"
               "  python -m platform.evaluate --model <run id> --dataset eurosat --classes new\n"
               "  python -m platform.evaluate --model ray_results/.../prompts.safetensors --dataset ~/my_photos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("prompts")
    src.add_argument("--model", required=True,
                     help="models:/<name>@<alias> or models:/<name>/<version> (registered prompts), an MLflow run id, "
                          "or a prompts.safetensors file (or a checkpoint folder holding one)")
    src.add_argument("--backbone", default=None,
                     help="the backbone to load (default: the one the prompts file names); it must be the same "
                          "architecture")
    src.add_argument("--pretrained", default=None,
                     help="the weights (default: the prompts file's: an open_clip tag, or a checkpoint path that "
                          "must exist here)")
    data = parser.add_argument_group("target")
    data.add_argument("--dataset", required=True, metavar="NAME|PATH",
                      help="a dataset registry key under --data-root, or a path to your own folder / manifest")
    data.add_argument("--data-root", default=default_data_root(), help="folder holding <dataset>/ (CoOp's layout)")
    data.add_argument("--split", default="test", choices=SPLITS,
                      help="which split to evaluate on (default: test); registry: the dataset's registry evaluation "
                           "set, the validation images the champion rule compares every version on")
    data.add_argument("--classes", default="all", choices=CLASS_SUBSETS,
                      help="all classes, or CoCoOp's base / new half of the sorted labels (default: all)")
    data.add_argument("--max-test-items", type=int, default=None,
                      help="evaluate on a class-balanced subset of this many items (quick checks; default: all)")
    data.add_argument("--cache-dir", default=default_cache_dir(), help="feature cache (shared with training)")
    data.add_argument("--dataset-name", default=None, help="your data's name (default: the folder's)")
    data.add_argument("--template", default=None, help="your data's zero-shot template, one {} for the class")
    data.add_argument("--classnames-file", default=None, help="your data's readable class names")
    data.add_argument("--split-file", default=None, help="your data's CoOp-format split JSON")
    data.add_argument("--split-seed", type=int, default=1, help="seed of your data's generated split (default: 1)")
    run = parser.add_argument_group("running and tracking")
    run.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 ...")
    run.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    run.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    run.add_argument("--experiment", default=None, help="MLflow experiment (default: coop-<target dataset>)")
    run.add_argument("--no-log", action="store_true", help="print the result only; log nothing to MLflow")
    run.add_argument("--record", action="store_true",
                     help="with --split registry and a registered version (--model models:/...): record the accuracy "
                          "on the version, so the champion rule can compare a version registered before it measured "
                          "one (a version that holds a measurement keeps it)")
    run.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    run.add_argument("-v", "--verbose", action="store_true", help="show the libraries' INFO logs")
    return parser


def resolve_prompts(model: str, tracking_uri: str, download_dir: Path) -> PromptSource:
    """Find the prompts file that ``--model`` names (downloading it from MLflow when it is a model or a run).

    Raises:
        ValueError: nothing of that name (one line, with what was looked for).
    """

    artifact = f"{artifacts.PROMPTS_ARTIFACT_DIR}/{artifacts.PROMPTS_FILE}"
    m = MODEL_URI_RE.fullmatch(model)
    if model.startswith("models:/") and m is None:
        raise ValueError(f"--model {model!r}: a registered model is models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient(tracking_uri)
    if m is not None:
        try:
            if m["alias"]:
                version = client.get_model_version_by_alias(m["name"], m["alias"])
            else:
                version = client.get_model_version(m["name"], m["version"])
        except MlflowException as err:
            raise ValueError(f"--model {model}: not in the registry of {tracking_uri} ({_first_line(err)}); list the "
                             "models in the MLflow UI (Models), or pass --tracking-uri") from None
        path = _download(client, version.run_id, artifact, download_dir, model)

        expected = (version.tags or {}).get(PROMPTS_SHA256_KEY)
        if expected:
            if verified_digest(path) != expected:
                raise ValueError(f"--model {model}: the prompts artifact of v{version.version} does not match the "
                                 "digest the registry recorded for it; refusing it")
        return PromptSource(path, f"{model} (v{version.version})", version.run_id, model, str(version.version))
    if RUN_ID_RE.fullmatch(model) and not Path(model).exists():
        return PromptSource(_download(client, model, artifact, download_dir, model), f"run {model}", model)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / artifacts.PROMPTS_FILE
    if not path.is_file():
        raise ValueError(f"--model {model!r}: no such prompts file, MLflow run id or registered model "
                         "(models:/<name>@<alias>)")
    return PromptSource(path.resolve(), str(path))


def _download(client: Any, run_id: str, artifact: str, download_dir: Path, what: str) -> Path:
    try:
        return Path(client.download_artifacts(run_id, artifact, str(download_dir)))
    except (MlflowException, OSError) as err:
        raise ValueError(f"--model {what}: cannot read {artifact} of run {run_id} ({_first_line(err)}); is it a "
                         "finished CoOp run?") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def resolve_device(value: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"--device {value!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {value}: no CUDA GPU is visible here; use --device cpu")
    return device


def check_transfer(meta: Any, classnames: Sequence[str], target: str) -> None:
    """Refuse a class-specific context and a class list it has no vectors for, before anything is computed."""

    try:
        check_classes(meta.classnames, meta.prompt.csc, classnames)
    except PromptTransferError as err:
        raise ValueError(f"cannot evaluate these prompts on {target}: {err}") from None


def evaluate_prompts(ctx: torch.Tensor, meta: Any, ref: DatasetRef, *, split: str, data_root: str, cache_dir: str,
                     max_items: int | None, backbone: str, pretrained: str, device: torch.device, batch_size: int,
                     progress: Any = None) -> dict[str, Any]:
    """The prompts' and zero-shot CLIP's accuracy on one split of ``ref`` (the numbers :func:`main` logs)."""

    splits = ref.load(data_root, cache_dir)
    measured = {}
    if split == "registry":  # a fixed set of the validation images (coop_core.fewshot.registry_eval_items)
        items = tuple(registry_eval_items(splits.val))
        splits, split = dataclasses.replace(splits, val=items), "val"
        measured = {"split_name": "registry", "registry_set": items_digest(items)}
    elif max_items is not None:
        splits = dataclasses.replace(splits, **{split: subset_test_items(splits.split(split), max_items)})
    check_transfer(meta, splits.classnames, ref.label)
    check_images_exist(splits, splits.split(split))
    clip = load_clip(backbone, pretrained, device=device)
    feats, skipped = evaluation_features(clip, splits, split, cache_dir=cache_dir, device=device,
                                         batch_size=batch_size, progress=progress)
    feats = feats.to(device)
    model = prompt_model(clip, ctx, meta.prompt, meta.classnames, splits.classnames, device, method=meta.method,
                         learned=meta.learned)
    coop = evaluate(model, feats)
    zs = zeroshot_evaluate(clip.model, clip.tokenizer, splits.classnames, splits.template, feats)
    if measured:
        split = measured.pop("split_name")
        measured["weights_digest"] = weights_digest(clip.model)
    return measured | {
            "dataset": ref.label, "split": split, "method": meta.method.name, "n_classes": len(splits.classnames),
            "n_images": len(feats.labels),
            "skipped_images": skipped, "template": splits.template, "acc": coop["acc"], "macro_f1": coop["macro_f1"],
            "zeroshot_acc": zs["acc"], "zeroshot_macro_f1": zs["macro_f1"], "image_dir": str(splits.image_dir)}


def record(source: PromptSource, result: Mapping[str, Any], tracking_uri: str) -> str:
    """Record the registry evaluation of ``source`` (a registered version) on the version; one line of what was done.

    Raises:
        ValueError: the version is another dataset's, or the classes evaluated are not all of the dataset's.
    """
    version = MlflowClient(tracking_uri).get_model_version(MODEL_URI_RE.fullmatch(source.model_uri)["name"],
                                                           source.version)
    if version.tags.get("dataset") != result["dataset"]:
        raise ValueError(f"{source.description} was trained on {version.tags.get('dataset')}, not "
                         f"{result['dataset']}: its registry measurement is on its own dataset (all classes)")
    return record_measurement(version, registry_acc=result["acc"], weights=result["weights_digest"],
                              images=result["registry_set"], tracking_uri=tracking_uri)


def log_result(result: Mapping[str, Any], source: PromptSource, meta: Any, *, tracking_uri: str, experiment: str,
               backbone: str, pretrained: str) -> dict[str, str]:
    """One MLflow run for the evaluation, tagged with and linked to the source run; its id and address."""

    split = result["split"]
    name = f"eval-{result['dataset']}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"coop.entry_point": "platform.evaluate", "coop.evaluated_on": result["dataset"],
            "coop.prompts": str(source.path)}
    if source.run_id:
        tags["coop.source_run_id"] = source.run_id
    if source.model_uri:
        tags.update({"coop.source_model": source.model_uri, "coop.source_version": source.version or ""})
    run_id = tracking.create_run(experiment, run_name=name, tags=tags, tracking_uri=tracking_uri)
    params = {"source": source.description, "source.dataset": meta.extra.get("dataset", "?"),
              "source.classes": len(meta.classnames), "backbone": backbone, "pretrained": pretrained,
              "prompt.n_ctx": meta.prompt.n_ctx, "prompt.csc": meta.prompt.csc,
              "prompt.class_token_position": meta.prompt.class_token_position, "prompt.ctx_init": meta.prompt.ctx_init,
              "target.dataset": result["dataset"], "target.split": split, "target.n_classes": result["n_classes"],
              "target.n_images": result["n_images"], "target.template": result["template"]}
    tracking.log_params(run_id, params, tracking_uri=tracking_uri)
    tracking.log_final_metrics(run_id, {f"{split}_acc": result["acc"], f"{split}_macro_f1": result["macro_f1"],
                                        f"zeroshot_{split}_acc": result["zeroshot_acc"],
                                        f"zeroshot_{split}_macro_f1": result["zeroshot_macro_f1"],
                                        "skipped_images": result["skipped_images"]}, tracking_uri=tracking_uri)
    experiment_id = tracking.get_or_create_experiment(experiment, tracking_uri=tracking_uri)
    link = ""
    if source.run_id:
        try:
            src_exp = MlflowClient(tracking_uri).get_run(source.run_id).info.experiment_id
            link = f" ([source run]({tracking.run_link(src_exp, source.run_id)}))"
        except Exception:  # the source run lives in another store: the tag still names it
            link = f" (source run `{source.run_id}`)"
    tracking.set_description(run_id, (
        f"**Evaluation** of the prompts {source.description}{link} on **{result['dataset']}** ({split} split, "
        f"{result['n_images']} images, {result['n_classes']} classes): CoOp {result['acc']:.2f} %, zero-shot CLIP "
        f"{result['zeroshot_acc']:.2f} % (template `{result['template']}`).\n\n"
        f"- prompts learned on {meta.extra.get('dataset', '?')} ({len(meta.classnames)} classes, "
        f"{'class-specific' if meta.prompt.csc else 'unified'} context of {meta.prompt.n_ctx}), backbone "
        f"`{backbone}` / `{pretrained}`"), tracking_uri=tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    return {"run_id": run_id, "run_url": tracking.run_url(tracking_uri, experiment_id, run_id)}


def format_result(result: Mapping[str, Any], source: PromptSource) -> str:
    lines = ["", f"Prompts {source.description} on {result['dataset']} ({result['split']} split, "
                 f"{result['n_images']} images, {result['n_classes']} classes)", "",
             "                   acc %   macro-F1 %",
             f"  CoOp           {result['acc']:7.2f}   {result['macro_f1']:9.2f}",
             f"  zero-shot CLIP {result['zeroshot_acc']:7.2f}   {result['zeroshot_macro_f1']:9.2f}"]
    if result.get("skipped_images"):
        lines.append(f"  ({result['skipped_images']} images could not be decoded and were left out)")
    if result.get("recorded"):
        lines += ["", f"  {result['recorded']}"]
    if result.get("run_url"):
        lines += ["", f"  MLflow run     {result['run_id']}  {result['run_url']}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    limit_http_retries()
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    try:
        if args.max_test_items is not None and args.max_test_items < 1:
            raise ValueError(f"--max-test-items must be >= 1, got {args.max_test_items}")
        if args.split == "registry" and args.max_test_items is not None:
            raise ValueError("--max-test-items does not apply to --split registry: the registry evaluation set is "
                             "fixed (every version is compared on all of it)")
        if args.record and (args.split != "registry" or not args.model.startswith("models:/")):
            raise ValueError("--record takes --split registry and a registered version (--model models:/<name>/<v> "
                             "or models:/<name>@<alias>): it records the version's accuracy on the registry "
                             "evaluation set")
        device = resolve_device(args.device)
        ref = dataset_ref_from_args(args)
        check_writable_dir(args.cache_dir, "--cache-dir")
        needs_store = args.model.startswith("models:/") or (RUN_ID_RE.fullmatch(args.model) is not None
                                                            and not Path(args.model).exists())
        if needs_store or not args.no_log:
            probe_tracking_store(tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            source = resolve_prompts(args.model, tracking_uri, Path(tmp))
            ctx, meta = load_prompts(source.path)
            if source.path.is_relative_to(tmp):  # downloaded: keep a copy the logged run can name
                digest = prompt_digest(ctx, meta.to_header(), meta.learned)
                keep = Path(args.cache_dir).expanduser() / "evaluated_prompts" / digest
                keep.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(keep / artifacts.PROMPTS_FILE, source.path.read_bytes())
                source = PromptSource(keep / artifacts.PROMPTS_FILE, source.description, source.run_id,
                                      source.model_uri, source.version)
        backbone = args.backbone or meta.backbone
        pretrained = args.pretrained or meta.pretrained
        with _FeatureBar(bars_wanted(json_output=args.json, verbose=args.verbose)) as bar:
            result = evaluate_prompts(ctx, meta, ref, split=args.split, data_root=str(Path(args.data_root).resolve()),
                                      cache_dir=str(Path(args.cache_dir).expanduser().resolve()),
                                      max_items=args.max_test_items, backbone=backbone, pretrained=pretrained,
                                      device=device, batch_size=args.batch_size, progress=bar.update)
    except (*INPUT_ERRORS, PromptFileError, WeightsUnavailableError) as err:
        return fail(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    if args.record:
        try:
            result["recorded"] = record(source, result, tracking_uri)
        except (ValueError, MlflowException) as err:
            return fail(f"--record: {_first_line(err)}")
    if not args.no_log:
        experiment = args.experiment or tracking.default_experiment(ref.name)
        try:
            result |= log_result(result, source, meta, tracking_uri=tracking_uri, experiment=experiment,
                                 backbone=backbone, pretrained=pretrained)
        except Exception as err:  # the numbers are computed: print them, say what failed
            sys.stderr.write(f"error: logging the evaluation to MLflow at {tracking_uri} failed ({_first_line(err)})\n")
            print(format_result(result, source))
            return 1
    print(format_result(result, source))
    if args.json:
        print(json.dumps(result | {"source": source.description, "source_run_id": source.run_id}, sort_keys=True,
                         default=str))
    return 0


if __name__ == "__main__":
    from platform.evaluate import main as _main

    sys.exit(_main())
