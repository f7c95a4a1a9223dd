"""One entry point for "can this run work on this data": every check a run's inputs must pass before any training
starts, cheap enough for a launcher to call before it starts workers (tokenizer and file headers only, no model).

The platform's launch path (``platform/launch.py``) calls :func:`check_run_inputs` once per run or sweep with every
shot count and prompt a trial may train; the checks themselves live beside what they check (the dataset, the few-shot
sampling, the prompt learner) and are importable there too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from coop_core.datasets.base import (
    DatasetSplits,
    check_every_class_has_training_images,
    check_every_class_readable,
    check_images_exist,
)
from coop_core.fewshot import FewShotSplits, build_few_shot, check_shots_fit
from coop_core.prompt_learner import check_prompt_fits


def check_run_inputs(splits: DatasetSplits, *, tokenizer: Callable, shots: Sequence[int | str],
                     prompts: Sequence[tuple[int, str] | tuple[int, str, bool]], seed: int,
                     cache_dir: str | Path | None
                     ) -> list[FewShotSplits]:
    """Refuse inputs no training run could use, in order: fewer than two classes, or a class without training
    images; a shot count above the smallest class (each of ``shots``); a prompt that does not fit the text context
    (each ``(n_ctx, ctx_init[, pad_ctx_init])`` of ``prompts``, with the class names); then, for each shot count, the
    few-shot split (built and cached under ``cache_dir``, so workers reuse it), whose images (and the test split's)
    must exist, with an image that opens for every class.

    Returns:
        The few-shot splits, one per shot count.

    Raises:
        ValueError: the first problem, in one line naming it and the fix.
    """
    check_every_class_has_training_images(splits)
    for k in shots:
        check_shots_fit(splits, k)
    for n_ctx, ctx_init, *pad in prompts:
        check_prompt_fits(tokenizer, splits.classnames, n_ctx, ctx_init, bool(pad and pad[0]))
    fewshots = []
    for k in shots:
        fewshot = build_few_shot(splits, k, seed, cache_dir)
        # The test split is the same for every shot count: its images are checked with the first one only.
        check_images_exist(splits, (*fewshot.train, *fewshot.val, *(splits.test if not fewshots else ())))
        check_every_class_readable(splits, fewshot.train)
        fewshots.append(fewshot)
    return fewshots
