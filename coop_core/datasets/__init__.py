"""Datasets: the registry, CoOp's datasets and the image dataset used by the training and evaluation loops.

Importing this package registers every dataset eagerly (``eurosat``, the CoOp catalog and ImageNet's evaluation-only
variants), so ``list_datasets()`` is complete without side-effect imports elsewhere. Any other image folder or manifest
loads through :func:`load_folder_dataset` without registration.
"""

from coop_core.datasets import catalog, eurosat, imagenet_variants  # noqa: F401  (register the datasets)
from coop_core.datasets.base import (
    CLASS_SUBSETS,
    COOP_DATASETS_URL,
    SPLIT_NAMES,
    DatasetNotFoundError,
    DatasetSpec,
    DatasetSplits,
    ImageListDataset,
    Item,
    UnreadableImageError,
    check_images_exist,
    class_subset_names,
    classnames_from_items,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    read_coop_split,
    readable_classname,
    register_dataset,
    select_classes,
    split_image_folder,
    split_per_class,
)
from coop_core.datasets.data import imagenet_a_wnids, imagenet_classnames, imagenet_r_wnids
from coop_core.datasets.download import DownloadError, tree_digest
from coop_core.datasets.folder import DEFAULT_TEMPLATE, FolderSource, folder_source, load_folder_dataset
from coop_core.datasets.imagenet_variants import DG_TARGETS

__all__ = [
    "DG_TARGETS",
    "check_images_exist",
    "CLASS_SUBSETS",
    "COOP_DATASETS_URL",
    "DEFAULT_TEMPLATE",
    "SPLIT_NAMES",
    "DatasetNotFoundError",
    "DatasetSpec",
    "DatasetSplits",
    "DownloadError",
    "FolderSource",
    "ImageListDataset",
    "Item",
    "UnreadableImageError",
    "class_subset_names",
    "classnames_from_items",
    "folder_source",
    "get_dataset_spec",
    "imagenet_a_wnids",
    "imagenet_classnames",
    "imagenet_r_wnids",
    "list_datasets",
    "load_dataset",
    "load_folder_dataset",
    "read_coop_split",
    "readable_classname",
    "register_dataset",
    "select_classes",
    "split_image_folder",
    "split_per_class",
    "tree_digest",
]
