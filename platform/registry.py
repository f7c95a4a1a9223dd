"""The prompt registry: a sweep's best prompt becomes a version of the MLflow registered model ``coop-<dataset>``.

Each version is the pyfunc of ``platform/pyfunc_model.py`` (logged as code, with ``coop_core`` shipped alongside, so
``mlflow.pyfunc.load_model("models:/coop-eurosat@champion")`` works in any process that has torch, open_clip and
mlflow) and carries tags: dataset, backbone, weights, shots, seed, class names, the full config, val/test accuracy.

Champion rule: a champion is the best prompt on the same images with the same CLIP. Each run measures its prompts
on its dataset's registry evaluation set (``coop_core.fewshot.registry_eval_items``: a fixed sample of the validation
split, the same images whatever the run's shots and seed; its own few-shot validation images are not) and records the
digests of that set and of its CLIP weights (``platform.artifacts.REGISTRY_METRIC`` and the keys beside it). Two
versions are comparable when both hold that accuracy and they share the backbone, the weights digest and the
evaluation set's digest. So

- ``champion`` moves to a new version when there is no champion yet, or when the champion is comparable and the new
  version's registry accuracy is strictly higher. A champion that is not comparable (another CLIP or other weights
  under the same name, other images, a version registered before the rule measured this) stays where it is, and the
  new version's description says why; promote by hand with ``python -m platform.registry set-champion --dataset
  eurosat --version 3`` (:func:`set_champion`).
- ``champion-<backbone>-<K>shot`` (e.g. ``champion-vit-b-16-16shot``) is the best of one backbone and shot count,
  under the same rule.
- The same prompts (the same sha256 of ``prompts.safetensors``) are one version: registering them again, from a
  resumed sweep or another run, returns the version that holds them.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from platform import tracking
from platform.artifacts import (
    ACCURACY_KEYS,
    N_CTX_EFFECTIVE_KEY,
    PROMPTS_FILE,
    REGISTRY_METRIC,
    REGISTRY_SET_KEY,
    SELECTION_METRIC,
    TEST_METRIC,
    WEIGHTS_DIGEST_KEY,
    ZEROSHOT_TEST_METRIC,
)
from platform.cli import Parser, fail
from platform.tracking_store import store_lock
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, Schema

import coop_core
from coop_core import load_prompts, verified_digest
from coop_core.config import METHOD_TITLES

logger = logging.getLogger(__name__)

CHAMPION = "champion"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
COOP_CORE_DIR = Path(coop_core.__file__).resolve().parent
MODEL_ARTIFACT_NAME = "model"
PROMPTS_SHA256_KEY = "prompts_sha256"  # model_config key (and version tag) holding the prompt file's digest
RULE_APPLIED_TAG = "champion_rule_applied"  # version tag: the champion rule ran for it (exactly once)
# What the pyfunc needs at load time (pinned to what logged it).
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "open_clip_torch", "safetensors", "pillow", "numpy", "pandas")


def registered_model_name(dataset: str) -> str:
    """``coop-<dataset>`` (``dataset`` may name a class subset: ``eurosat-base``, see ``RunSpec.model_key``)."""
    return f"coop-{dataset}"


def _model_key(spec: Mapping[str, Any]) -> str:
    """The registered model's key of a resolved run config (its dataset, or dataset and class subset)."""
    return str(spec.get("model_key") or spec["dataset"])


def backbone_slug(backbone: str) -> str:
    """A short alias-safe name for a backbone: ``ViT-B-16`` -> ``vit-b-16``, ``cfg/tiny-vit.json`` -> ``tiny-vit``."""
    name = Path(backbone).stem if backbone.endswith(".json") else backbone
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "backbone"


def scoped_champion_alias(backbone: str, shots: int | str) -> str:
    """The per-family champion alias, ``champion-<backbone>-<K>shot``."""
    return f"{CHAMPION}-{backbone_slug(backbone)}-{shots}shot"


@dataclass(frozen=True)
class Registration:
    """Outcome of registering a prompt.

    version: the new model version. champion_version: the version ``@champion`` points to afterwards.
    promoted: whether ``@champion`` moved to the new version. reason: one line saying why (or why not).
    """

    model_name: str
    version: int
    champion_version: int
    promoted: bool
    reason: str
    scoped_alias: str


def _pip_requirements() -> list[str]:
    reqs = []
    for package in SERVING_PACKAGES:
        try:
            reqs.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            reqs.append(package)
    return reqs


def _version_by_alias(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _float_tag(version, key: str) -> float:
    try:
        return float(version.tags[key])
    except (KeyError, TypeError, ValueError):
        return float("-inf")


def version_tags(spec: Mapping[str, Any], classnames: list[str], metrics: Mapping[str, float],
                 extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags of a prompt version: what it is (method, backbone, weights, shots, seed, classes, config) and how it
    did."""
    tags = {
        "dataset": str(spec["dataset"]),
        "backbone": str(spec["model"]["backbone"]),
        "weights": str(spec["model"]["pretrained"]),
        "shots": str(spec["train"]["shots"]),
        "seed": str(spec["train"]["seed"]),
        "method": str(spec.get("method", {}).get("name", "coop")),  # specs written before methods were CoOp's
        "classnames": json.dumps(list(classnames)),
        "config": json.dumps(spec, sort_keys=True),
    }
    for key in (*ACCURACY_KEYS, REGISTRY_METRIC):
        if metrics.get(key) is not None:
            tags[key] = f"{float(metrics[key]):.4f}"
    for key in (WEIGHTS_DIGEST_KEY, REGISTRY_SET_KEY):
        if spec.get(key):
            tags[key] = str(spec[key])
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def model_signature(classnames: list[str]):
    """The served model's signature: one ``image`` column in (a path, image bytes, or base64 text of them), the most
    probable class, its probability and one probability column per class out."""

    outputs = [ColSpec(DataType.string, "class_name"), ColSpec(DataType.double, "probability")]
    outputs += [ColSpec(DataType.double, f"prob_{name}") for name in classnames]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "image")]), outputs=Schema(outputs))


def serve_command(name: str, alias: str = CHAMPION, port: int = 5001) -> str:
    """The command that serves ``models:/<name>@<alias>`` over REST on this machine (README: Serving)."""
    return f"mlflow models serve -m models:/{name}@{alias} --env-manager local --host 127.0.0.1 --port {port}"


def version_description(spec: Mapping[str, Any], classnames: list[str], metrics: Mapping[str, float],
                        extra: Mapping[str, str] | None = None) -> str:
    """The model version's description in the UI: what it is, trained on what, how well, how to load and serve it."""
    name = registered_model_name(_model_key(spec))
    prompt, train = spec["prompt"], spec["train"]
    n_ctx = spec.get(N_CTX_EFFECTIVE_KEY) or prompt["n_ctx"]
    context = "one context per class (CSC)" if prompt["csc"] else "one context shared by all classes"
    init = f"initialised from {prompt['ctx_init']!r}" if prompt["ctx_init"] else "randomly initialised"
    acc = [f"{label} {float(metrics[key]):.2f} %" for key, label in
           ((SELECTION_METRIC, "validation"), (TEST_METRIC, "test"), (ZEROSHOT_TEST_METRIC, "zero-shot CLIP on test"))
           if metrics.get(key) is not None]
    n_test = f" ({spec['n_test']} test images)" if spec.get("n_test") else ""
    method = spec.get("method", {}).get("name", "coop")
    origin = ""
    if extra and extra.get("sweep"):
        origin = f" Best trial (`{extra.get('trial_id')}`) of sweep `{extra['sweep']}` by validation accuracy."
    return "\n".join([
        f"{METHOD_TITLES.get(method, method)} prompt for CLIP `{spec['model']['backbone']}` "
        f"(weights `{spec['model']['pretrained']}`) on "
        f"{spec['dataset']} ({len(classnames)} classes), {train['shots']}-shot, seed {train['seed']}: {n_ctx} learned "
        f"context vectors, {context}, {init}, class name at the {prompt['class_token_position']}.{origin}",
        "",
        f"Accuracy: {', '.join(acc)}{n_test}.",
        "",
        f"Load: `mlflow.pyfunc.load_model(\"models:/{name}/<version>\").predict(pandas.DataFrame({{\"image\": "
        "[path_or_bytes, ...]}))` gives `class_name`, `probability` and one `prob_<class>` column per class.",
        "",
        f"Serve: `{serve_command(name)}`, then POST `{{\"dataframe_split\": {{\"columns\": [\"image\"], "
        "\"data\": [[\"<base64 image>\"]]}}` to `http://127.0.0.1:5001/invocations` (README: Serving).",
    ])


def log_prompt_model(checkpoint_dir: str | Path, spec: Mapping[str, Any], *, run_id: str, tracking_uri: str) -> str:
    """Save the pyfunc for the prompts in ``checkpoint_dir`` as artifact ``model`` of run ``run_id``; return its URI.

    The model is saved locally and uploaded with an explicit client, so mlflow's global tracking URI and active run
    (and the ``MLFLOW_*_URI`` variables its fluent API would set for child processes) are left alone.

    Raises:
        FileNotFoundError: the checkpoint has no prompts, or the backbone JSON named by the config is missing.
    """
    prompts = Path(checkpoint_dir) / PROMPTS_FILE
    if not prompts.is_file():
        raise FileNotFoundError(f"{prompts} not found: only a trial's final checkpoint holds its prompts")
    _, meta = load_prompts(prompts)
    artifacts = {"prompts": str(prompts)}
    backbone = str(spec["model"]["backbone"])
    if backbone.endswith(".json"):
        path = Path(backbone).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"backbone config {backbone} not found (needed to make the model self-contained)")
        artifacts["backbone_config"] = str(path)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow suggests an input example on every save; the signature already says what the model takes, and an
        # example would make MLflow run CLIP at registration time.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        local = Path(tmp) / MODEL_ARTIFACT_NAME
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(PYFUNC_FILE),
            artifacts=artifacts,
            code_paths=[str(COOP_CORE_DIR)],
            pip_requirements=_pip_requirements(),
            signature=model_signature(list(meta.classnames)),
            # The served model refuses a prompts artifact other than the one it was logged with (pyfunc_model.py).
            model_config={PROMPTS_SHA256_KEY: verified_digest(prompts)},
        )
        MlflowClient(tracking_uri).log_artifacts(run_id, str(local), artifact_path=MODEL_ARTIFACT_NAME)
    return f"runs:/{run_id}/{MODEL_ARTIFACT_NAME}"


def register_prompt(
    checkpoint_dir: str | Path,
    spec: Mapping[str, Any],
    metrics: Mapping[str, float],
    *,
    run_id: str,
    tracking_uri: str,
    extra_tags: Mapping[str, str] | None = None,
) -> Registration:
    """Register a trial's final prompts as a new version of ``coop-<dataset>`` and apply the champion rule.

    Idempotent: registering the same prompts from the same run again (a resumed sweep, a retry after the tracking
    server came back) returns the existing version, and the champion rule runs once per version.

    Args:
        checkpoint_dir: the trial's final checkpoint (``prompts.safetensors`` inside).
        spec: the trial's resolved run config (``RunSpec.to_dict()``: dataset, model, prompt, train ...).
        metrics: its final metrics; ``val_acc`` decides the champion.
        run_id: the MLflow run the model is logged into (the trial's child run).
        tracking_uri: tracking and registry store.
        extra_tags: more version tags (e.g. the sweep's parent run id).
    """
    with store_lock(tracking_uri):  # two sweeps registering at once take turns: each applies the rule to the other's
        return _register(checkpoint_dir, spec, metrics, run_id=run_id, tracking_uri=tracking_uri,
                         extra_tags=extra_tags)


def comparison_blocker(champion: Any, challenger_tags: Mapping[str, str]) -> str | None:
    """Why ``champion`` (a model version) and a version with ``challenger_tags`` cannot be compared, or None when
    they can: the same backbone, CLIP weights and registry evaluation set, and both measured on it."""
    held = champion.tags
    if held.get("backbone") != challenger_tags["backbone"]:
        return f"its backbone is {held.get('backbone')}, not {challenger_tags['backbone']}"
    if REGISTRY_METRIC not in held or REGISTRY_METRIC not in challenger_tags:
        if REGISTRY_METRIC in held:
            return "this version was not measured on the registry evaluation set"
        return (f"it was not measured on the registry evaluation set (registered before the rule measured it; measure "
                f"it with python -m platform.evaluate --model models:/{champion.name}/{champion.version} --dataset "
                f"{held.get('dataset', '<dataset>')} --split registry --record)")
    if held.get(WEIGHTS_DIGEST_KEY) != challenger_tags.get(WEIGHTS_DIGEST_KEY):
        return (f"it uses other CLIP weights (digest {str(held.get(WEIGHTS_DIGEST_KEY))[:12]}, not "
                f"{str(challenger_tags.get(WEIGHTS_DIGEST_KEY))[:12]})")
    if held.get(REGISTRY_SET_KEY) != challenger_tags.get(REGISTRY_SET_KEY):
        return "it was measured on other images (another validation split under this dataset's name)"
    return None


def record_measurement(version: Any, *, registry_acc: float, weights: str, images: str, tracking_uri: str) -> str:
    """Record on a model version (registered before the rule measured it) its accuracy on the dataset's registry
    evaluation set and the digests of those images and of the CLIP weights it was measured with
    (``platform.evaluate --split registry --record``): the champion rule can then compare it. A version that holds a
    measurement keeps it (a version is measured once, by the run that trained it or by this). Returns what was done,
    one line.
    """
    if REGISTRY_METRIC in version.tags:
        return (f"{version.name} v{version.version} already holds registry acc {version.tags[REGISTRY_METRIC]}: "
                "left as it is")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    with store_lock(tracking_uri):  # the champion rule reads these tags under the same lock
        for key, value in ((WEIGHTS_DIGEST_KEY, weights), (REGISTRY_SET_KEY, images),
                           (REGISTRY_METRIC, f"{float(registry_acc):.4f}")):  # the metric last: it marks it measured
            client.set_model_version_tag(version.name, version.version, key, value)
    return (f"recorded on {version.name} v{version.version}: registry acc {registry_acc:.2f} on the registry "
            "evaluation set; the champion rule compares it from the next registration on")


def _rule(client: MlflowClient, name: str, alias: str, tags: Mapping[str, str]) -> tuple[bool, str, Any]:
    """Whether ``alias`` moves to the version with ``tags``, why, and the version it points to now."""
    current = _version_by_alias(client, name, alias)
    if current is None:
        return True, "no champion yet", None
    blocker = comparison_blocker(current, tags)
    if blocker is not None:
        return False, f"@{alias} v{current.version} is not comparable: {blocker}; left in place", current
    new, best = float(tags[REGISTRY_METRIC]), _float_tag(current, REGISTRY_METRIC)
    verb = "beats" if new > best else "does not beat"
    return new > best, f"registry acc {new:.2f} {verb} @{alias} v{current.version}'s {best:.2f} on the same images", \
        current


def _register(checkpoint_dir: str | Path, spec: Mapping[str, Any], metrics: Mapping[str, float], *, run_id: str,
              tracking_uri: str, extra_tags: Mapping[str, str] | None) -> Registration:
    name = registered_model_name(_model_key(spec))
    _, meta = load_prompts(Path(checkpoint_dir) / PROMPTS_FILE)
    # Compared at the precision the version tags keep (4 decimals): a champion whose tag reads 10.0000 is not beaten
    # by a new 10.000000149.
    tags = version_tags(spec, list(meta.classnames), metrics, extra_tags)
    tags[PROMPTS_SHA256_KEY] = verified_digest(Path(checkpoint_dir) / PROMPTS_FILE)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    scoped = scoped_champion_alias(tags["backbone"], tags["shots"])
    registered = _registered_before(client, name, tags[PROMPTS_SHA256_KEY])
    if registered is not None and registered.tags.get(RULE_APPLIED_TAG) == "true":
        # The same prompts again (a resumed sweep, a retried registration, or another run that learned them): one
        # version, one rule.
        version = int(registered.version)
        champion = _version_by_alias(client, name, CHAMPION)
        champion_version = int(champion.version) if champion is not None else version
        origin = "" if registered.run_id == run_id else f" (from run {registered.run_id})"
        logger.info("%s v%d already holds these prompts; @%s -> v%d", name, version, CHAMPION, champion_version)
        return Registration(name, version, champion_version, champion_version == version,
                            f"the same prompts are v{version}{origin}: not registered again", scoped)
    description = version_description(spec, list(meta.classnames), metrics, extra_tags)
    if registered is None:
        model_uri = log_prompt_model(checkpoint_dir, spec, run_id=run_id, tracking_uri=tracking_uri)
        try:
            client.create_registered_model(name, description=(
                f"CoOp prompts for CLIP on {spec['dataset']}: each version is one learned context with its backbone, "
                "classes and accuracy (see its description and tags). `@champion` is the best on the same images "
                "(the dataset's registry evaluation set) with the same CLIP weights; `@champion-<backbone>-<K>shot` "
                "the best of each backbone and shot count. Serve the champion with `" + serve_command(name) + "`."))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        registered = client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags,
                                                 description=description)
    version = int(registered.version)

    move_scoped, scoped_reason, _ = _rule(client, name, scoped, tags)
    if move_scoped:
        client.set_registered_model_alias(name, scoped, str(version))
    promoted, reason, current = _rule(client, name, CHAMPION, tags)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    client.update_model_version(name, str(version), description=(
        f"{description}\n\nChampion rule: {'promoted to @' + CHAMPION if promoted else 'not promoted'} ({reason}); "
        f"@{scoped}: {'moved here' if move_scoped else 'not moved'} ({scoped_reason})."))
    client.set_model_version_tag(name, str(version), RULE_APPLIED_TAG, "true")
    champion_version = version if promoted else int(current.version)
    logger.info("registered %s v%d (%s); @%s -> v%d", name, version, reason, CHAMPION, champion_version)
    return Registration(name, version, champion_version, promoted, reason, scoped)


def _registered_before(client: MlflowClient, name: str, digest: str) -> Any:
    """The version of ``name`` that already holds these prompts (from any run), if any (None for a new model)."""
    found = client.search_model_versions(f"name = '{name}'")
    return next((v for v in found if v.tags.get(PROMPTS_SHA256_KEY) == digest), None)


def set_champion(dataset: str, version: int, *, tracking_uri: str) -> None:
    """Point ``coop-<dataset>@champion`` at ``version`` unconditionally (an explicit, cross-family promotion).

    Raises:
        mlflow.exceptions.MlflowException: no such registered model or version.
    """
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name = registered_model_name(dataset)
    client.get_model_version(name, str(version))  # fails with a clear message when it does not exist
    client.set_registered_model_alias(name, CHAMPION, str(version))


def main(argv: list[str] | None = None) -> int:
    """``python -m platform.registry set-champion --dataset D --version V``: promote a version by hand."""

    parser = Parser(prog="python -m platform.registry",
                    description="Manage the registered CoOp prompts (coop-<dataset>).")
    sub = parser.add_subparsers(dest="command", required=True)
    promote = sub.add_parser("set-champion", help="point coop-<dataset>@champion at a version, whatever its family")
    promote.add_argument("--dataset", required=True, help="dataset name (the model is coop-<dataset>)")
    promote.add_argument("--version", required=True, type=int, help="model version to promote")
    promote.add_argument("--tracking-uri", default=None,
                         help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    args = parser.parse_args(argv)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    try:
        set_champion(args.dataset, args.version, tracking_uri=uri)
    except MlflowException as err:
        return fail(str(err).splitlines()[0])
    print(f"{registered_model_name(args.dataset)}@{CHAMPION} -> v{args.version}")
    return 0


if __name__ == "__main__":
    import sys
    from platform.registry import main as _main

    sys.exit(_main())
