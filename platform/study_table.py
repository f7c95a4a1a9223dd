"""A study's table: per shot count and dataset, CoOp's and zero-shot CLIP's test accuracy per seed with their mean and
spread over the seeds (``study_results``), several datasets' tables combined with their average (``combine``), and
the table as text or Markdown (``format_table``). Pure functions of the trials' rows; ``platform/study.py`` runs the
study and logs these."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from platform import artifacts
from typing import Any

HARMONIC = "harmonic mean"
AVERAGE = "average over targets"


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation; the deviation is None below two values (one seed has no spread,
    and "± 0.00" would claim one)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


METHOD_FIELD = "method.name"  # the trial config's key of a study comparing methods (a grid field)


def study_results(rows: Sequence[Mapping[str, Any]], protocol: str, source: str, targets: Sequence[str]
                  ) -> dict[str, Any]:
    """The study's table from its trials: per shot count and dataset, the learned prompts' and zero-shot CLIP's test
    accuracy per seed and their mean ± std over the seeds.

    Only trials that ran every epoch count. ``source`` is the training data's label, ``targets`` the evaluation
    targets' (``artifacts.target_key``); base-to-new adds the harmonic mean of base and new per seed, dg and cross
    the average over the targets per seed. A study comparing methods (trials with several ``method.name``) has
    each method's table in ``by_method`` and their rows one after the other, labelled ``<dataset> · <method>``.
    """
    methods = list(dict.fromkeys(str(r["config"][METHOD_FIELD]) for r in rows if METHOD_FIELD in r["config"]))
    if len(methods) > 1:
        return merge_methods({m: _one_method([r for r in rows if r["config"].get(METHOD_FIELD) == m], protocol,
                                             source, targets) for m in methods})
    return _one_method(rows, protocol, source, targets)


def merge_methods(parts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Several methods' results (each as :func:`study_results` gives one) as one table, each row labelled with its
    method; ``by_method`` keeps each method's own results."""
    first = next(iter(parts.values()))
    cells = [{**c, "dataset": f"{c['dataset']} · {m}", "method": m, "source_dataset": c["dataset"]}
             for m, r in parts.items() for c in r["cells"]]
    return {**first, "datasets": [c["dataset"] for c in cells], "cells": cells, "methods": list(parts),
            "by_method": dict(parts), "seeds": sorted({s for r in parts.values() for s in r["seeds"]}),
            "trials_counted": sum(r["trials_counted"] for r in parts.values()),
            "trials": sum(r["trials"] for r in parts.values())}


def _one_method(rows: Sequence[Mapping[str, Any]], protocol: str, source: str, targets: Sequence[str]
                ) -> dict[str, Any]:
    per: dict[tuple[Any, str], dict[str, dict[int, float]]] = {}
    shots_seen, seeds_seen = set(), set()
    for row in rows:
        if not row.get("finished"):
            continue
        m, config = row["last_result"], row["config"]
        shots, seed = config.get("train.shots"), int(config.get("train.seed", 0))
        shots_seen.add(shots)
        seeds_seen.add(seed)
        values = {source: (m.get(artifacts.TEST_METRIC), m.get(artifacts.ZEROSHOT_TEST_METRIC))}
        found = artifacts.target_results(m)
        for label in targets:
            t = found.get(label, {})
            values[label] = (t.get("test_acc"), t.get("zeroshot_test_acc"))
        if protocol == "base2new":
            (b, zb), (n, zn) = values[source], values[targets[0]]
            if None not in (b, n, zb, zn):
                values[HARMONIC] = (_harmonic(b, n), _harmonic(zb, zn))
        elif targets:
            accs = [values[t] for t in targets]
            if all(None not in v for v in accs):
                values[AVERAGE] = (statistics.fmean(a for a, _ in accs), statistics.fmean(z for _, z in accs))
        for label, (coop, zs) in values.items():
            if coop is None:
                continue
            cell = per.setdefault((shots, label), {"coop": {}, "zeroshot": {}})
            cell["coop"][seed] = float(coop)
            if zs is not None:
                cell["zeroshot"][seed] = float(zs)
    labels = [source, *targets] + ([HARMONIC] if protocol == "base2new" else [AVERAGE] if targets else [])
    order = sorted(shots_seen, key=lambda k: (isinstance(k, str), k))
    cells = []
    for shots in order:
        for label in labels:
            cell = per.get((shots, label))
            if cell is None:
                continue
            mean, std = _mean_std(list(cell["coop"].values()))
            zmean, _ = _mean_std(list(cell["zeroshot"].values()))
            cells.append({"shots": shots, "dataset": label, "coop_mean": mean, "coop_std": std,
                          "coop_per_seed": {str(k): v for k, v in sorted(cell["coop"].items())},
                          "zeroshot_mean": zmean, "n_seeds": len(cell["coop"]),
                          "gain": None if zmean is None else mean - zmean})
    return {"protocol": protocol, "source": source, "targets": list(targets), "datasets": labels,
            "shots": order, "seeds": sorted(seeds_seen), "cells": cells,
            "trials_counted": sum(bool(r.get("finished")) for r in rows), "trials": len(rows)}


def format_table(results: Mapping[str, Any], markdown: bool = False) -> str:
    """The study's table: one row per shot count and dataset (Markdown for the MLflow run's description)."""
    learned = "prompts" if results.get("methods") else "CoOp"
    header = ("shots", "dataset", f"{learned} test acc % (mean ± std)", "per seed", "zero-shot CLIP %",
              f"{learned} - zero-shot")
    body = []
    for c in results["cells"]:
        seeds = ", ".join(f"{k}: {v:.2f}" for k, v in c["coop_per_seed"].items())
        zs = "-" if c["zeroshot_mean"] is None else f"{c['zeroshot_mean']:.2f}"
        gain = "-" if c["gain"] is None else f"{c['gain']:+.2f}"
        spread = f" ± {c['coop_std']:.2f}" if c["coop_std"] is not None else ""
        body.append((str(c["shots"]), c["dataset"], f"{c['coop_mean']:.2f}{spread} (n={c['n_seeds']})", seeds, zs,
                     gain))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join("  " + fmt.format(*r) for r in [header, *body])


def combine(studies: Sequence[Mapping[str, Any]], protocol: str) -> dict[str, Any]:
    """Several datasets' study results as one table, with their average per shot count (each dataset's mean over
    seeds, averaged over the datasets; base-to-new's average harmonic mean is that of the average base and new
    accuracies, as CoCoOp's tables report it). Studies comparing methods are combined per method."""
    if studies and all("by_method" in r for r in studies):
        methods = list(studies[0]["by_method"])
        if all(list(r["by_method"]) == methods for r in studies):
            return merge_methods({m: combine([r["by_method"][m] for r in studies], protocol) for m in methods})
    cells, by_shots = [], {}
    for results in studies:
        for c in results["cells"]:
            if protocol == "base2new":
                role = {results["source"]: "base", HARMONIC: HARMONIC}.get(c["dataset"], "new")
            else:
                role = "source" if c["dataset"] == results["source"] else None
            label = c["dataset"] if c["dataset"] != HARMONIC else f"{results['source'].split('.')[0]} {HARMONIC}"
            cells.append({**c, "dataset": label})
            if role is not None:
                by_shots.setdefault(c["shots"], {}).setdefault(role, []).append(c)
    shots_order = []
    for results in studies:
        shots_order += [k for k in results["shots"] if k not in shots_order]
    average = []
    for shots in shots_order:
        roles = by_shots.get(shots, {})
        for role in (("base", "new") if protocol == "base2new" else ("source",)):
            group = roles.get(role, [])
            if len(group) != len(studies):
                continue  # a dataset without this cell: no honest average
            zs = [c["zeroshot_mean"] for c in group]
            # The spread over seeds of the per-seed averages, where every dataset has the same seeds (an average of
            # the datasets' deviations would be no deviation of anything).
            seeds = set(group[0]["coop_per_seed"])
            per_seed = ({k: statistics.fmean(c["coop_per_seed"][k] for c in group) for k in sorted(seeds)}
                        if all(set(c["coop_per_seed"]) == seeds for c in group) else {})
            average.append({"shots": shots, "dataset": f"average.{role}" if protocol == "base2new" else "average",
                            "coop_mean": statistics.fmean(c["coop_mean"] for c in group),
                            "coop_std": _mean_std(list(per_seed.values()))[1], "coop_per_seed": per_seed,
                            "zeroshot_mean": None if None in zs else statistics.fmean(zs),
                            "n_seeds": min(c["n_seeds"] for c in group)})
        if protocol == "base2new" and sum(c["shots"] == shots for c in average) == 2:
            base, new = [c for c in average if c["shots"] == shots][-2:]
            zs = None if None in (base["zeroshot_mean"], new["zeroshot_mean"]) else _harmonic(
                base["zeroshot_mean"], new["zeroshot_mean"])
            average.append({"shots": shots, "dataset": f"average {HARMONIC}",
                            "coop_mean": _harmonic(base["coop_mean"], new["coop_mean"]), "coop_std": None,
                            "coop_per_seed": {}, "zeroshot_mean": zs, "n_seeds": base["n_seeds"]})
    for c in average:
        c["gain"] = None if c["zeroshot_mean"] is None else c["coop_mean"] - c["zeroshot_mean"]
    seeds = sorted({s for r in studies for s in r["seeds"]})
    return {"protocol": protocol, "source": ", ".join(r["source"] for r in studies), "targets": [],
            "datasets": [c["dataset"] for c in cells + average], "shots": shots_order, "seeds": seeds,
            "cells": cells + average, "trials_counted": sum(r["trials_counted"] for r in studies),
            "trials": sum(r["trials"] for r in studies)}
