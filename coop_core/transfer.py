"""Using a learned context on another class list: domain generalisation, base-to-new and cross-dataset evaluation.

A unified context (one set of vectors shared by every class) describes no class in particular, so it serves any
class list as it is. A class-specific (CSC) context has one row per training class; it can only serve classes it was
trained on, so its rows are picked by class name (``clean_classname``, case-insensitive) in the target's order. That
covers ImageNet-A and -R, whose 200 classes carry ImageNet's names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from coop_core.prompt_learner import clean_classname

logger = logging.getLogger(__name__)


class PromptTransferError(ValueError):
    """A class-specific context has no vectors for some target classes. One line."""


def _key(name: str) -> str:
    return clean_classname(name).casefold()


def classes_without_vectors(source_classnames: Sequence[str], csc: bool, target_classnames: Sequence[str]
                            ) -> list[str]:
    """The target classes a context learned for ``source_classnames`` has no vectors for: none for a unified context;
    for a class-specific one, those not among the source classes by name."""
    if not csc:
        return []
    known = {_key(name) for name in source_classnames}
    return [name for name in target_classnames if _key(name) not in known]


def check_transfer(source_classnames: Sequence[str], csc: bool, target_classnames: Sequence[str]) -> None:
    """Refuse, before anything is computed, a class-specific context and target classes it was not trained on.

    Raises:
        PromptTransferError: naming how many target classes have no vector, the first few, and the fix.
    """
    missing = classes_without_vectors(source_classnames, csc, target_classnames)
    if missing:
        raise PromptTransferError(
            f"the class-specific context has no vector for {len(missing)} of the {len(target_classnames)} target "
            f"classes (first: {', '.join(repr(m) for m in missing[:3])}): a class-specific context only transfers to "
            "classes it was trained on; train a unified context (no --csc) to evaluate on new classes"
        )


def transfer_context(ctx: torch.Tensor, source_classnames: Sequence[str], csc: bool,
                     target_classnames: Sequence[str]) -> torch.Tensor:
    """The context to use for ``target_classnames``, given one learned for ``source_classnames``.

    A name that occurs several times among the source classes (CLIP's ImageNet names hold ``missile`` and
    ``sunglasses`` twice) is matched in order: the target's first occurrence takes the source's first row, and so on
    (ImageNet-A/-R keep ImageNet's wnid order, so their ``missile`` is ImageNet's first); a warning names it.

    Args:
        ctx: ``(n_ctx, width)`` for a unified context, ``(n_cls, n_ctx, width)`` for a class-specific one.
        source_classnames: the classes the context was learned for, index == row.
        csc: whether ``ctx`` is class-specific.
        target_classnames: the classes to evaluate, index == label.

    Returns:
        ``ctx`` itself for a unified context; the target classes' rows, ``(n_target, n_ctx, width)``, for CSC.

    Raises:
        PromptTransferError: a class-specific context and target classes it was not trained on.
        ValueError: a context whose shape does not fit ``csc`` and the source classes.
    """
    if not csc:
        if ctx.dim() != 2:
            raise ValueError(f"a unified context is (n_ctx, width), got shape {tuple(ctx.shape)}; pass csc=True for a "
                             "class-specific one")
        return ctx
    if ctx.dim() != 3 or ctx.shape[0] != len(source_classnames):
        raise ValueError(f"a class-specific context is (n_cls={len(source_classnames)}, n_ctx, width), got shape "
                         f"{tuple(ctx.shape)}; pass the class names it was learned for")
    check_transfer(source_classnames, csc, target_classnames)
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(source_classnames):
        rows.setdefault(_key(name), []).append(row)
    used: dict[str, int] = {}
    picked = []
    for name in target_classnames:
        candidates = rows[_key(name)]
        nth = used.get(_key(name), 0)
        used[_key(name)] = nth + 1
        row = candidates[min(nth, len(candidates) - 1)]
        if len(candidates) > 1:
            logger.warning("class name %r is shared by source rows %s: using row %d", name, candidates, row)
        picked.append(row)
    return ctx[torch.tensor(picked, dtype=torch.long)]  # (n_target, n_ctx, width)
