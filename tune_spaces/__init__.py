"""Search spaces for CoOp sweeps, one per dataset, keyed by the dataset's registry name (== the CLI value).

``get_space("eurosat")`` returns a dict keyed by config field names (``"prompt.n_ctx"``, ``"prompt.ctx_init"``,
``"prompt.class_token_position"``, ``"prompt.csc"``, ``"train.lr"``) whose values are plain domains
(:class:`Choice`, :class:`LogUniform`). Datasets with a hand-written module (``eurosat``) register it here; every
other registered coop_core dataset gets the generic space built from its zero-shot template.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from coop_core.catalog import Catalog
from coop_core.datasets import get_dataset_spec, list_datasets
from tune_spaces import eurosat
from tune_spaces._builder import (
    Choice,
    Domain,
    LogUniform,
    Space,
    check_space,
    coop_space,
    sample_space,
    split_sample,
    template_words,
    with_methods,
)

_SPACES: Catalog[Callable[[], Space]] = Catalog("search space", unknown="no search space for dataset {name!r}")


def register_space(name: str, factory: Callable[[], Space]) -> None:
    """Register ``factory`` (returning a fresh space) under the dataset key ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    _SPACES.add(name, factory)


def list_spaces() -> list[str]:
    """Dataset keys that have a search space, sorted."""
    return _SPACES.names()


def get_space(dataset: str) -> Space:
    """A fresh, validated search space for ``dataset``.

    Raises:
        ValueError: No space is registered for ``dataset``; the message lists those that are.
    """
    return check_space(_SPACES.get(dataset)())


def space_for(dataset: str, template: str) -> Space:
    """The registered space of ``dataset``, or for a dataset without one (a user's own image folder) the generic
    space built from its zero-shot ``template``."""
    if dataset in _SPACES:
        return get_space(dataset)
    return check_space(coop_space(template))


register_space("eurosat", eurosat.space)
for _name in list_datasets():
    if _name not in _SPACES and not get_dataset_spec(_name).evaluation_only:  # nothing to train on
        register_space(_name, partial(coop_space, get_dataset_spec(_name).template))

__all__ = [
    "Choice", "Domain", "LogUniform", "Space", "check_space", "coop_space", "get_space", "list_spaces",
    "register_space", "sample_space", "space_for", "split_sample", "template_words", "with_methods",
]
