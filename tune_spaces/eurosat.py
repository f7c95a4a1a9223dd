"""EuroSAT's CoOp search space: the generic space with EuroSAT's template words as a context initialisation.

With EuroSAT's template "a centered satellite photo of {}." the context can start random, from "a photo of a", or
from "a centered satellite photo of".
"""

from __future__ import annotations

from coop_core.datasets.eurosat import EUROSAT_TEMPLATE
from tune_spaces._builder import Space, coop_space


def space() -> Space:
    """The EuroSAT search space, keyed by config field names (see :func:`tune_spaces._builder.coop_space`)."""
    return coop_space(EUROSAT_TEMPLATE)
