"""Datasets: the registry, CoOp's datasets and the image dataset used by the training and evaluation loops.

Importing this package registers every dataset eagerly (``eurosat`` and the CoOp catalog), so ``list_datasets()``
is complete without side-effect imports elsewhere.
"""

from coop_core.datasets import catalog, eurosat  # noqa: F401  (register the datasets)
from coop_core.datasets.base import (
    COOP_DATASETS_URL,
    SPLIT_NAMES,
    DatasetNotFoundError,
    DatasetSpec,
    DatasetSplits,
    ImageListDataset,
    Item,
    UnreadableImageError,
    classnames_from_items,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    read_coop_split,
    readable_classname,
    register_dataset,
    split_image_folder,
)
from coop_core.datasets.download import DownloadError, tree_digest

__all__ = [
    "COOP_DATASETS_URL",
    "SPLIT_NAMES",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DatasetSplits",
    "DownloadError",
    "ImageListDataset",
    "Item",
    "UnreadableImageError",
    "classnames_from_items",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "read_coop_split",
    "readable_classname",
    "register_dataset",
    "split_image_folder",
    "tree_digest",
]
