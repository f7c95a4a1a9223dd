"""CoOp's image transforms: random-resized-crop + flip for training, resize + centre crop for testing.

Both end in CLIP's normalisation. CoOp (Dassl) uses bicubic interpolation and a crop scale of (0.08, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

TRAIN_CROP_SCALE = (0.08, 1.0)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Random-resized-crop (scale 0.08-1) + horizontal flip + CLIP normalisation."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=TRAIN_CROP_SCALE, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def test_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the short side to ``image_size`` + centre crop + CLIP normalisation."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def describe(transform: T.Compose) -> str:
    """A stable text description of a transform, used in feature-cache keys."""
    return repr(transform)
