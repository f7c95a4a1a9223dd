"""Packed trials: a Tune trial that trains several configurations of a sweep at once on one CLIP
(``coop_core.pack``), and what the driver needs to treat each configuration as its own trial.

A packed trial's config is ``{"pack": [member config, ...]}``, each member config the searched values a solo
trial's config would hold. Member ``j`` of Tune trial ``T`` is configuration ``T-m<j>`` (:func:`member_id`): its own
MLflow child run (tagged with that id), its own checkpoint folder inside the pack's checkpoint, its own ASHA decision
(``platform.sweep.halving``) and its own Optuna trial (``platform.sweep.pack_search``). Each report of a packed trial
carries every member's latest report under ``"members"`` (member id -> the keys a solo trial reports, plus
``"pack_status"``), so everything downstream -- the trial rows, the best trial, registration, the report -- sees one
row per configuration.

Which members share a pack: configurations differ only in ``prompt.*`` and ``train.*`` fields, and one pack runs on one
CLIP, one device and one precision (``train.precision`` is never searched).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

PACK_KEY = "pack"  # a packed trial's config: {"pack": [member config, ...]}
MEMBERS_KEY = "members"  # a packed trial's report: {"members": {member id: member report}}
MEMBER_EPOCHS_KEY = "member_epochs"  # and {"member_epochs": {member id: [epoch row since the previous report]}}
STATUS_KEY = "pack_status"  # in a member's report: running | finished | stopped | failed
PACK_FILE = "pack.json"  # in a pack's checkpoint: the members' ids, configs and statuses
RUNNING, FINISHED, STOPPED, FAILED = "running", "finished", "stopped", "failed"


def member_id(trial_id: str, index: int) -> str:
    """The id of member ``index`` of Tune trial ``trial_id``: its MLflow ``coop.trial_id`` tag and checkpoint folder."""
    return f"{trial_id}-m{index}"


def is_packed(config: Mapping[str, Any] | None) -> bool:
    return bool(config) and PACK_KEY in config


def members(trial_id: str, config: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(member id, member config) of a packed trial's config, in pack order."""
    return [(member_id(trial_id, j), dict(cfg)) for j, cfg in enumerate(config[PACK_KEY])]


def member_reports(result: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The members' latest reports in a packed trial's report (empty before the first), nested as reported or
    flattened as Tune hands results to its searchers (``members/<member id>/<key>``)."""
    result = result or {}
    if MEMBERS_KEY in result:
        return {k: dict(v) for k, v in (result[MEMBERS_KEY] or {}).items()}
    out: dict[str, dict[str, Any]] = {}
    for key, value in result.items():
        head, _, rest = key.partition("/")
        if head == MEMBERS_KEY and "/" in rest:
            mid, _, field = rest.partition("/")
            out.setdefault(mid, {})[field] = value
    return out


def member_epochs(result: Mapping[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """Each member's epoch rows since the previous report, in a packed trial's report (nested or flattened as
    :func:`member_reports` reads): a pack reports at most every second, and the epochs in between come together."""
    result = result or {}
    if MEMBER_EPOCHS_KEY in result:
        return {k: [dict(r) for r in v] for k, v in (result[MEMBER_EPOCHS_KEY] or {}).items()}
    prefix = MEMBER_EPOCHS_KEY + "/"
    return {k[len(prefix):]: [dict(r) for r in v] for k, v in result.items() if k.startswith(prefix)}


def member_checkpoint(pack_checkpoint: str | None, mid: str) -> str | None:
    """Where member ``mid``'s checkpoint is inside its pack's checkpoint."""
    return f"{pack_checkpoint.rstrip('/')}/{mid}" if pack_checkpoint else None


def configurations(trial_id: str, config: Mapping[str, Any] | None, result: Mapping[str, Any] | None = None,
                   checkpoint: str | None = None) -> list[tuple[str, dict[str, Any], dict[str, Any], str | None]]:
    """(id, config, latest report, checkpoint) of each configuration a Tune trial trains: the trial itself (its
    result and checkpoint), or each member of a packed trial (its report in the pack's result, its folder in the
    pack's checkpoint)."""
    if not is_packed(config):
        return [(trial_id, dict(config or {}), dict(result or {}), checkpoint)]
    reports = member_reports(result)
    return [(mid, cfg, reports.get(mid, {}), member_checkpoint(checkpoint, mid))
            for mid, cfg in members(trial_id, config)]


def pack_sizes(n_configs: int, pack_size: int) -> list[int]:
    """The sizes of the fewest packs of at most ``pack_size`` holding ``n_configs`` configurations, differing by one
    at most (7 in packs of 4: 4 and 3; 32 in packs of 5: 5, 5, 5, 5, 4, 4, 4)."""
    if n_configs <= 0:
        return []
    n_packs = math.ceil(n_configs / pack_size)
    base, extra = divmod(n_configs, n_packs)
    return [base + (1 if i < extra else 0) for i in range(n_packs)]


def chunk(configs: Sequence[Mapping[str, Any]], pack_size: int,
          costs: Sequence[float] | None = None) -> list[list[dict[str, Any]]]:
    """``configs`` cut into packs of :func:`pack_sizes`: in order, or, given each configuration's ``costs``
    (:func:`text_step_cost`), with the packs' total costs as even as the sizes allow (the costliest configuration
    first, each into the open pack with the least cost so far; each pack's members in the grid's order).

    Packs of a sweep train side by side, so the slowest one sets the sweep's time: cut in the grid's order, the 36
    configurations of ``bench/packed_trials.py`` (``n_ctx`` 4/8/16 first) made one pack of short prompts and one of
    long ones, and at ViT-B/16 one CPU core sat idle for the last fifth of the sweep.
    """
    sizes = pack_sizes(len(configs), pack_size)
    if costs is None:
        out, start = [], 0
        for size in sizes:
            out.append([dict(c) for c in configs[start:start + size]])
            start += size
        return out
    if len(costs) != len(configs):
        raise ValueError(f"{len(costs)} costs for {len(configs)} configurations")
    members: list[list[int]] = [[] for _ in sizes]
    load = [0.0] * len(sizes)
    for i in sorted(range(len(configs)), key=lambda i: (-costs[i], i)):
        j = min((j for j in range(len(sizes)) if len(members[j]) < sizes[j]), key=lambda j: (load[j], j))
        members[j].append(i)
        load[j] += costs[i]
    return [[dict(configs[i]) for i in sorted(m)] for m in members]


TAIL_TOKENS = 4  # what :func:`text_step_cost` counts for a class name, the period and the end-of-text token


def text_step_cost(spec: Any, n_classes: int, n_train_all: int) -> float:
    """About how much text-encoder work the configuration ``spec`` (a ``RunSpec``) trains, relative to the other
    configurations of its sweep: prompt token rows per step times steps. A unified context with the class token at
    the end is one prefix shared by every class in a pack's flat pass (its rows once); any other prompt's context is
    per class. ``n_train_all``: the training items of ``--shots all``."""
    prompt, train = spec.prompt, spec.train
    if prompt.csc or prompt.class_token_position != "end":
        rows = n_classes * (prompt.n_ctx + TAIL_TOKENS)
    else:
        rows = prompt.n_ctx + n_classes * TAIL_TOKENS
    items = n_train_all if isinstance(train.shots, str) else min(n_train_all, train.shots * n_classes)
    return float(train.resolved_epochs * math.ceil(items / train.batch_size) * rows)


def grid_configs(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of a grid (``{field: values}``), the last field varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
