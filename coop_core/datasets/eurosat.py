"""EuroSAT (Helber et al.): 27,000 Sentinel-2 RGB tiles in 10 land-use classes, as prepared for CoOp.

Layout (CoOp's DATASETS.md)::

    <root>/eurosat/2750/<ClassFolder>/<ClassFolder>_<n>.jpg
    <root>/eurosat/split_zhou_EuroSAT.json

With the split file, the split is CoOp's (train 13,500 / val 5,400 / test 8,100). Without it, a deterministic 50/20/30
per-class split is made from the image folders (as CoOp's ``read_and_split_data`` does), with a warning: numbers are
then not comparable to the paper's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from coop_core.datasets.base import (
    DatasetSpec,
    DatasetSplits,
    make_splits,
    read_coop_split,
    register_dataset,
    require_dir,
    split_image_folder,
)
from coop_core.datasets.download import download_and_extract

logger = logging.getLogger(__name__)

# CoOp's readable names (datasets/eurosat.py NEW_CNAMES), folder -> name; labels follow the sorted folder names.
EUROSAT_CLASSNAMES: dict[str, str] = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

EUROSAT_TEMPLATE = "a centered satellite photo of {}."

# Mirrors of the EuroSAT RGB archive, preferred first. Its top folder is "EuroSAT_RGB" (Zenodo) or "2750" (DFKI).
EUROSAT_URLS: tuple[str, ...] = (
    "https://zenodo.org/records/7711810/files/EuroSAT_RGB.zip",
    "https://madm.dfki.de/files/sentinel/EuroSAT.zip",
)
EUROSAT_ARCHIVE_TOP_DIRS: tuple[str, ...] = ("EuroSAT_RGB", "2750")

# Content digest of the 27,000 JPEGs of the public EuroSAT RGB distribution, computed with
# ``coop_core.datasets.download.tree_digest(<root>/eurosat/2750)``: sha256 over the sorted lines
# "<relpath under 2750, POSIX>\t<sha256 of the file>\n". Computed from ../shared/data/eurosat/2750 (byte-identical to
# the public copy) and cross-checked with:
#   cd 2750 && find . -name '*.jpg' -printf '%P\n' | while read f; do printf '%s\t%s\n' "$f" \
#     "$(sha256sum "$f" | cut -d' ' -f1)"; done | LC_ALL=C sort | sha256sum
EUROSAT_TREE_SHA256 = "6a274c30837fefaa970cd77896b691ba985fbb8835f3cb81f55b65111dda5fee"

# Fallback split when split_zhou_EuroSAT.json is absent (CoOp's read_and_split_data arguments for EuroSAT).
FALLBACK_P_TRAIN = 0.5
FALLBACK_P_VAL = 0.2
FALLBACK_SEED = 1

EUROSAT_LAYOUT = """\
<root>/eurosat/
    2750/                        # the EuroSAT RGB images, one folder per class
        AnnualCrop/AnnualCrop_1.jpg
        ...
        SeaLake/SeaLake_3000.jpg
    split_zhou_EuroSAT.json      # CoOp's split (optional: without it a 50/20/30 split is made)"""


def load_eurosat(root: Path, spec: DatasetSpec) -> DatasetSplits:
    """Read EuroSAT under the data root ``root`` (see the module docstring for the layout).

    Raises:
        DatasetNotFoundError: If the image folder is missing.
    """
    image_dir = require_dir(spec, root, spec.image_path(root))
    split_path = spec.dataset_path(root) / spec.split_file if spec.split_file else None
    if split_path is not None and split_path.is_file():
        train, val, test = read_coop_split(split_path)
        source = str(split_path)
    else:
        logger.warning(
            "%s not found: using a deterministic %d/%d/%d per-class split (seed %d) instead of CoOp's split; "
            "results are not comparable to the paper's",
            split_path,
            round(FALLBACK_P_TRAIN * 100),
            round(FALLBACK_P_VAL * 100),
            round((1 - FALLBACK_P_TRAIN - FALLBACK_P_VAL) * 100),
            FALLBACK_SEED,
        )
        train, val, test = split_image_folder(
            image_dir,
            p_train=FALLBACK_P_TRAIN,
            p_val=FALLBACK_P_VAL,
            seed=FALLBACK_SEED,
            new_classnames=EUROSAT_CLASSNAMES,
        )
        source = (f"a {round(FALLBACK_P_TRAIN * 100)}/{round(FALLBACK_P_VAL * 100)}/"
                  f"{round((1 - FALLBACK_P_TRAIN - FALLBACK_P_VAL) * 100)} per-class split of {image_dir} (seed "
                  f"{FALLBACK_SEED})")
    return make_splits(spec, image_dir, train, val, test, split_source=source)


def download_eurosat(root: Path, spec: DatasetSpec) -> Path:
    """Download the EuroSAT RGB images into ``<root>/eurosat/2750`` and verify them against the known digest.

    The split JSON is not downloaded (CoOp distributes it via Google Drive); without it the fallback split is used.
    """
    return download_and_extract(
        EUROSAT_URLS,
        spec.image_path(root),
        top_dirs=EUROSAT_ARCHIVE_TOP_DIRS,
        expected_tree_sha256=EUROSAT_TREE_SHA256,
    )


EUROSAT = register_dataset(
    DatasetSpec(
        name="eurosat",
        dataset_dir="eurosat",
        image_dir="2750",
        split_file="split_zhou_EuroSAT.json",
        template=EUROSAT_TEMPLATE,
        loader=load_eurosat,
        layout=EUROSAT_LAYOUT,
        download=download_eurosat,
    )
)
