"""CoOp's protocols as one command: ``python -m platform.study --dataset eurosat --shots 1 2 4 8 16 --seeds 1 2 3``.

A study trains one fixed prompt configuration (the flags, a ``--preset``, or ``--from-champion``) at every shot count
and seed, as a Ray Tune grid over ``train.shots`` x ``train.seed`` (``platform.tune``'s sweep machinery: warm trial
processes, retries, ``--resume``, one MLflow parent run with a child run per trial), with no early stopping and
nothing registered: a study measures. Each trial trains CoOp's epochs for its shot count (1 shot 50, 2-4 shots 100,
8-16 shots 200) unless ``--epochs`` says otherwise. Protocols (``--protocol``):

- ``fewshot`` (default): test accuracy against shots beside zero-shot CLIP, mean ± std over the seeds (the paper's
  few-shot curves);
- ``dg``: domain generalisation, train on ``--dataset`` (ImageNet) and test the same prompts on ``--targets``
  (default: whichever of ImageNet-V2, -Sketch, -A and -R are under ``--data-root``);
- ``base2new``: CoCoOp's base-to-new generalisation, train on the base half of the classes, test on base and on the
  new half, with their harmonic mean;
- ``cross``: cross-dataset transfer, train on ``--dataset`` and test on ``--targets`` (default: every other
  registered dataset under ``--data-root``), with the average over the targets.

Trials test the final prompts on every target right after training (``RunSpec.eval_targets``, reported as
``target/<label>/...`` metrics). When the trials have ended, the study's table (per shot count and dataset: mean ±
std over seeds, the per-seed values, zero-shot CLIP) and its figure are logged to the parent run (``study/``
artifacts, ``study/<dataset>/test_acc_mean`` metrics with step = shots, and the table in the run's description).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from platform import tracking
from platform.cli import (
    Parser,
    add_infra_arguments,
    add_run_arguments,
    configure_logging,
    dataset_ref,
    dataset_ref_from_args,
    fail,
    parse_run_args,
    spec_from_args,
)
from platform.launch import INPUT_ERRORS
from platform.registry import CHAMPION, registered_model_name
from platform.run_spec import DatasetRef, RunSpec
from platform.study_table import combine, format_table, study_results
from platform.sweep.flags import add_sweep_arguments, infra_settings_from_args, present, sweep_settings_from_args
from platform.sweep.plan import SweepPlan, SweepSettings
from platform.sweep.run import run_sweep
from platform.sweep.state import SweepState
from platform.tracking import resolve_tracking_uri
from platform.tracking_store import probe_tracking_store
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from coop_core.config import MethodConfig
from coop_core.datasets import DG_TARGETS, get_dataset_spec, list_datasets

logger = logging.getLogger(__name__)

PROTOCOLS = ("fewshot", "dg", "base2new", "cross")
STUDY_ARTIFACT_DIR = "study"


def build_parser() -> argparse.ArgumentParser:

    parser = Parser(
        prog="python -m platform.study",
        description="Run one of CoOp's evaluation protocols: a fixed prompt configuration trained at every shot count "
                    "and seed (a Ray Tune grid, every trial an MLflow child run of the study's run), then the table of "
                    "mean ± std test accuracy over the seeds beside zero-shot CLIP, and the figure, logged to the "
                    "study's MLflow run.",
        epilog="Examples (see README, Reproducing the paper):\n"
               "  python -m platform.study --dataset eurosat --data-root DATA --shots 1 2 4 8 16 --seeds 1 2 3\n"
               "  python -m platform.study --protocol dg --dataset imagenet --data-root DATA --shots 16 --epochs 50\n"
               "  python -m platform.study --protocol base2new --dataset eurosat --data-root DATA --shots 16\n"
               "  python -m platform.study --protocol cross --dataset imagenet --targets caltech101 oxford_pets ...\n"
               "Resume an interrupted study: the same command with --resume (and --study-name NAME).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(parser, study=True)
    study = parser.add_argument_group("study")
    study.add_argument("--protocol", default="fewshot", choices=PROTOCOLS,
                       help="fewshot: accuracy vs shots (default); dg: domain generalisation to --targets; base2new: "
                            "train on base classes, test on base and new; cross: transfer to other datasets")
    study.add_argument("--targets", nargs="+", default=None, metavar="NAME|PATH",
                       help="datasets the prompts are tested on after training (dg: default the ImageNet variants "
                            "present under --data-root; cross: default every other dataset present there)")
    study.add_argument("--from-champion", action="store_true",
                       help="take the prompt configuration (context length and initialisation, class position, CSC, "
                            "learning rate) from the registered champion coop-<dataset>@champion instead of the flags")
    add_sweep_arguments(parser, study=True)
    add_infra_arguments(parser)
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Targets and configuration
# ----------------------------------------------------------------------------------------------------------------


def present_datasets(data_root: str, names: Sequence[str]) -> list[str]:
    """Those of the registry datasets ``names`` whose image folder exists under ``data_root``."""
    return [n for n in names if get_dataset_spec(n).image_path(Path(data_root).expanduser().resolve()).is_dir()]


def resolve_targets(args: argparse.Namespace, source: DatasetRef) -> tuple[DatasetRef, ...]:
    """The evaluation targets of the study's protocol (see the module docstring).

    Raises:
        ValueError: a target given for a protocol that takes none, or none found where some are needed.
    """
    if args.protocol in ("fewshot", "base2new"):
        if args.targets:
            raise ValueError(f"--targets: the {args.protocol} protocol tests on the training dataset itself; use "
                             "--protocol dg or cross to test on other datasets")
        return (DatasetRef(source.name, source.source, "new"),) if args.protocol == "base2new" else ()
    if args.targets:
        return tuple(dataset_ref(t) for t in args.targets)
    if args.protocol == "dg":
        names = present_datasets(args.data_root, DG_TARGETS)
        if not names:
            layouts = "; ".join(f"{n}: {get_dataset_spec(n).layout.splitlines()[0].split('#')[0].strip()}"
                                for n in DG_TARGETS)
            raise ValueError(f"--protocol dg: none of {', '.join(DG_TARGETS)} is under {args.data_root} ({layouts}); "
                             "prepare them as in CoOp's DATASETS.md, or name the targets with --targets")
    else:
        candidates = [n for n in list_datasets() if n != source.name and not get_dataset_spec(n).evaluation_only]
        names = present_datasets(args.data_root, candidates)
        if not names:
            raise ValueError(f"--protocol cross: no other dataset is under {args.data_root}; prepare some (CoOp's "
                             "DATASETS.md) or name the targets with --targets")
    return tuple(DatasetRef(n) for n in names)


def resume_flags(protocol: str, targets: Sequence[DatasetRef]) -> tuple[str, ...]:
    """The study's own flags its ``--resume`` command repeats: the protocol, and the targets of dg and cross (as
    ``--targets`` takes them: a built-in dataset's key, or the path of your folder or manifest)."""
    flags = ("--protocol", protocol)
    if protocol in ("dg", "cross"):
        flags += ("--targets", *(t.source.path if t.source is not None else t.name for t in targets))
    return flags


def with_champion(spec: RunSpec, tracking_uri: str) -> RunSpec:
    """``spec`` with the prompt configuration, learning rate and CLIP of ``coop-<dataset>@champion``
    (``--from-champion``).

    Raises:
        ValueError: no champion, or a version without its config tag.
    """
    probe_tracking_store(tracking_uri)  # an unknown scheme or a missing store: its own line, not "no champion"
    name = registered_model_name(spec.model_key)
    try:
        version = MlflowClient(tracking_uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        raise ValueError(f"--from-champion: {name} has no @{CHAMPION} in {tracking_uri}; run a sweep first "
                         f"(python -m platform.tune --dataset {spec.dataset}) or give the configuration as flags"
                         ) from None
    try:
        config = json.loads(version.tags["config"])
    except (KeyError, ValueError):
        raise ValueError(f"--from-champion: {name} v{version.version} has no readable config tag") from None
    prompt, train, model = config["prompt"], config["train"], config["model"]
    method = MethodConfig(**config["method"]) if "method" in config else MethodConfig()  # older versions: CoOp
    logger.info("prompt configuration of %s@%s (v%s): %s", name, CHAMPION, version.version,
                {**prompt, "lr": train["lr"], "method": method.name})
    return dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, backbone=model["backbone"], pretrained=model["pretrained"]),
        prompt=dataclasses.replace(spec.prompt, n_ctx=int(prompt["n_ctx"]), ctx_init=prompt["ctx_init"],
                                   csc=bool(prompt["csc"]), class_token_position=prompt["class_token_position"],
                                   pad_ctx_init=bool(prompt.get("pad_ctx_init", False))),
        train=dataclasses.replace(spec.train, lr=float(train["lr"])), method=method)


def describe(protocol: str, targets: Sequence[DatasetRef], methods: Sequence[str] = ()):
    """The study run's description (a ``SweepPlan.describe``)."""

    def text(spec: Any, info: Mapping[str, Any]) -> str:
        what = {"fewshot": "test accuracy against shots", "dg": "domain generalisation",
                "base2new": "base-to-new generalisation (train on the base classes, test on base and new)",
                "cross": "cross-dataset transfer"}[protocol]
        on = f" to {', '.join(t.label for t in targets)}" if protocol in ("dg", "cross") else ""
        names = ", ".join(methods) or spec.method.name
        return (f"**Study `{info['name']}`**: {what}{on}, {names} on {spec.data_ref.label} with "
                f"`{spec.model.backbone}`, "
                f"a {spec.prompt.n_ctx}-token {'class-specific' if spec.prompt.csc else 'unified'} context "
                f"(class at the {spec.prompt.class_token_position}), at every shot count and seed; each trial is a "
                "child run below. The table and figure appear here and under the `study/` artifacts when the trials "
                f"have ended.\n\n- [trials table]({tracking.runs_view_link(info['experiment_id'], info['view_key'])})"
                f"\n- study folder: `{info['sweep_dir']}`")

    return text


def finish(protocol: str, targets: Sequence[DatasetRef]):
    """Log the study's table, results and figure to its parent run (a ``SweepPlan.finish``)."""

    def log(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], state: SweepState) -> dict:
        from dashboards.study import plot_study  # lazy for start-up: see log_combined



        spec = state.spec
        results = study_results(rows, protocol, spec.data_ref.label, [t.label for t in targets])
        uri, parent = state.tracking_uri, state.parent_run_id
        client = MlflowClient(uri)
        folder = Path(summary["sweep_dir"]) / STUDY_ARTIFACT_DIR if "://" not in summary["sweep_dir"] else None
        with tempfile.TemporaryDirectory() as tmp:
            out = folder or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            (out / "table.md").write_text(format_table(results, markdown=True) + "\n")
            drawn = plot_study(results, out / "acc_vs_shots.png")
            for f in sorted(out.iterdir()):
                client.log_artifact(parent, str(f), artifact_path=STUDY_ARTIFACT_DIR)
        metrics = []
        for c in results["cells"]:
            if isinstance(c["shots"], int):
                key = f"{STUDY_ARTIFACT_DIR}/{metric_label(c)}"
                metrics.append((f"{key}/test_acc_mean", c["coop_mean"], c["shots"]))
                if c["coop_std"] is not None:  # one seed: no spread to log
                    metrics.append((f"{key}/test_acc_std", c["coop_std"], c["shots"]))
                if c["zeroshot_mean"] is not None:
                    metrics.append((f"{key}/zeroshot_test_acc", c["zeroshot_mean"], c["shots"]))
        for key, value, step in metrics:
            client.log_metric(parent, key.replace(" ", "_"), value, step=step)
        current = client.get_run(parent).data.tags.get(tracking.NOTE_TAG, "")
        tracking.set_description(parent, current.split("\n\n## Results")[0] + "\n\n## Results\n\n"
                                 + format_table(results, markdown=True)
                                 + f"\n\nFigure: `{STUDY_ARTIFACT_DIR}/acc_vs_shots.png`.", tracking_uri=uri)
        return {"study": results | {"figure": str(folder / "acc_vs_shots.png") if folder else
                                    f"{STUDY_ARTIFACT_DIR}/acc_vs_shots.png", "figure_data": drawn}}

    return log


def metric_label(cell: Mapping[str, Any]) -> str:
    """A table row's name in MLflow metric keys: ``<dataset>``, or ``<method>/<dataset>`` in a study comparing
    methods (the table's " · " is not a character MLflow takes in a name)."""
    return f"{cell['method']}/{cell['source_dataset']}" if "method" in cell else cell["dataset"]


def report(summary: Mapping[str, Any]) -> str:
    """The study's table after the sweep's report (a ``SweepPlan.report``)."""
    results = summary.get("study")
    if not results or not results["cells"]:
        return "\n  study: no trial ran every epoch, no table"
    n_seeds = len(results["seeds"])
    lines = ["", f"Study ({results['protocol']}): test accuracy over {n_seeds} seed(s) "
                 f"{', '.join(map(str, results['seeds']))}; {results['trials_counted']} of {results['trials']} "
                 "trials counted", "", format_table(results), "",
             f"  figure             {results['figure']} (also under the study run's {STUDY_ARTIFACT_DIR}/ artifacts)"]
    return "\n".join(lines)


def log_combined(results: Mapping[str, Any], parents: Mapping[str, str], tracking_uri: str, name: str) -> dict:
    """The several-dataset study as one MLflow run (experiment ``coop-studies``) linking each dataset's study run."""
    # Imported when drawing, not at the top: after platform.study's own imports, dashboards.study (matplotlib, and
    # MLflow through dashboards.sweep) adds 2.0-4.4 s (measured on the 2-core development machine), which --help and a
    # bad input would pay for nothing.
    from dashboards.study import plot_study

    run_id = tracking.create_run("coop-studies", run_name=name, tracking_uri=tracking_uri,
                                 tags={"coop.entry_point": "platform.study", "coop.protocol": results["protocol"],
                                       "coop.study_runs": json.dumps(dict(parents))})
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "table.md").write_text(format_table(results, markdown=True) + "\n")
        plot_study(results, out / "acc_vs_shots.png")
        for f in sorted(out.iterdir()):
            client.log_artifact(run_id, str(f), artifact_path=STUDY_ARTIFACT_DIR)
    for c in results["cells"]:
        if c["dataset"].startswith("average") and isinstance(c["shots"], int):
            client.log_metric(run_id, f"{metric_label(c).replace(' ', '_')}/test_acc_mean", c["coop_mean"],
                              step=c["shots"])
    links = "\n".join(f"- {ds}: study run `{rid}`" for ds, rid in parents.items())
    tracking.set_description(run_id, f"**Study `{name}`** ({results['protocol']}) over {len(parents)} datasets; "
                             f"each dataset's own study run:\n{links}\n\n## Results\n\n"
                             + format_table(results, markdown=True), tracking_uri=tracking_uri)
    tracking.end_run(run_id, "FINISHED", tracking_uri=tracking_uri)
    return {"run_id": run_id}


def plan_studies(args: argparse.Namespace) -> list[tuple[str, RunSpec, tuple[DatasetRef, ...], SweepSettings]]:
    """One study per ``--dataset``: the value as given (a key or a path: the study's name in a combined table), its
    base run (the flags', or the champion's configuration), its evaluation targets, and its sweep settings (a grid
    over every shot count and seed).

    Raises:
        ValueError: a flag combination a study cannot take, or a value the configs refuse (one line).
    """
    datasets = list(args.dataset)
    own = [f for f in ("dataset_name", "template", "classnames_file", "split_file") if getattr(args, f)]
    if len(datasets) > 1 and own:
        raise ValueError(f"--{own[0].replace('_', '-')} describes one dataset of your own; give one --dataset per "
                         "study to use it")
    if len(set(datasets)) != len(datasets):
        raise ValueError("--dataset names a dataset twice")
    if len(set(args.shots)) != len(args.shots) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError("--shots and --seeds must not repeat a value")
    classes = "base" if args.protocol == "base2new" else "all"
    # Every shot count and seed, once each: nothing searched, no trial stopped early (the plan's choice).
    grid = (f"train.shots={','.join(map(str, args.shots))}", f"train.seed={','.join(map(str, args.seeds))}")
    studies = []
    for value in datasets:
        source = dataset_ref_from_args(args, value, classes=classes)
        # The base run takes the first shot count and seed; the grid sets every trial's. use_gpu is resolved against
        # the cluster once Ray is up.
        spec = spec_from_args(args, ref=source, shots=args.shots[0], seed=args.seeds[0], use_gpu=args.use_gpu != "no")
        if args.from_champion:
            if len(args.method) > 1:
                raise ValueError("--from-champion trains the champion's own method; compare methods with flags or "
                                 "a --preset instead")
            spec = with_champion(spec, resolve_tracking_uri(args.tracking_uri))
        name = f"{args.sweep_name}-{source.name}" if args.sweep_name and len(datasets) > 1 else args.sweep_name
        settings = dataclasses.replace(sweep_settings_from_args(args), grid=grid, num_samples=1, name=name)
        studies.append((value, spec, resolve_targets(args, source), settings))
    return studies


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 no trial finished, 2 bad input)."""
    args = parse_run_args(build_parser(), argv)
    configure_logging(args.verbose)
    try:
        studies = plan_studies(args)
        infra = infra_settings_from_args(args)
    except INPUT_ERRORS as err:
        return fail(str(err))
    collected: dict[str, dict] = {}
    codes = []
    for value, spec, targets, settings in studies:
        log = finish(args.protocol, targets)

        def finish_and_keep(summary, rows, state, log=log, key=value):
            out = log(summary, rows, state)
            collected[key] = {"results": out["study"], "parent_run_id": state.parent_run_id,
                              "tracking_uri": state.tracking_uri}
            return out

        plan = SweepPlan(kind="study", entry_point="platform.study", search=False, early_stopping=False,
                         register=False, describe=describe(args.protocol, targets, settings.methods),
                         finish=finish_and_keep,
                         report=report, json_keys=("study",), eval_targets=targets,
                         resume_flags=resume_flags(args.protocol, targets))
        codes.append(present(run_sweep(spec, settings, infra, plan), plan, json_output=infra.json))
        if codes[-1] == 2:
            return 2  # a bad input: the line is printed, the other datasets would likely fail alike
    if len(studies) > 1 and len(collected) == len(studies):
        results = combine([c["results"] for c in collected.values()], args.protocol)
        first = next(iter(collected.values()))
        name = f"study-{args.protocol}-{time.strftime('%Y%m%d-%H%M%S')}"
        logged = log_combined(results, {k: c["parent_run_id"] for k, c in collected.items()}, first["tracking_uri"],
                              name)
        print(f"\nStudy over {len(studies)} datasets ({args.protocol}), each dataset's mean over its seeds and their "
              f"average:\n\n{format_table(results)}\n\n  MLflow run         {logged['run_id']} (experiment "
              "'coop-studies')")
        if args.json:
            print(json.dumps({"studies": {k: c["parent_run_id"] for k, c in collected.items()},
                              "combined": results, "combined_run_id": logged["run_id"]}, sort_keys=True))
    return max(codes)


if __name__ == "__main__":
    from platform.cli import run_command
    from platform.study import main as _main

    run_command(_main)
