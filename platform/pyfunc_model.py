"""An MLflow pyfunc that classifies images with a learned CoOp prompt (logged as "models from code").

MLflow loads this *file* by path in the serving process and takes the model from ``mlflow.models.set_model``; it never
imports the ``platform`` package (whose name clashes with the standard library's). The file therefore imports only
mlflow, torch, numpy, pandas, PIL and ``coop_core``, which is shipped with the model through ``code_paths``.

Artifacts:
    prompts: the learned context as safetensors (``coop_core.save_prompts``); its header names the backbone, the
        weights, the class names and the prompt configuration.
    backbone_config: the open_clip model-config JSON, when the backbone is a JSON path (so the model is
        self-contained); absent for named architectures such as ``ViT-B-16``.

Model config (``mlflow.pyfunc.load_model(uri, model_config={...})``): ``prompts_sha256`` (set when the model is
logged) is the digest of the prompts it was logged with, and a prompts artifact with another digest is refused;
``pretrained`` overrides the weights named in
the prompt file (e.g. a local checkpoint path on the serving machine), ``device`` picks the device (default: CUDA when
available), ``batch_size`` the images per forward pass.

Input: a pandas DataFrame whose ``image`` column (else its first column) holds image paths, raw image bytes (or
base64 text of them), PIL images or HxWx3 uint8 arrays; or a numpy batch, either ``(n, H, W, 3)`` uint8 images or
``(n, 3, S, S)`` float images already preprocessed with CLIP's test transform. Output: a DataFrame with ``class_name``
(the most probable class), ``probability`` (its probability) and one ``prob_<class name>`` column per class. The
registered model's signature declares the ``image`` column (``platform.registry.model_signature``), so through
``mlflow.pyfunc`` and the REST server the input is that DataFrame; the numpy forms are for ``unwrap_python_model()``.
An unreadable image fails the request with one line naming it (HTTP 400 when served).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError

PROMPTS_ARTIFACT = "prompts"
PROMPTS_SHA256_KEY = "prompts_sha256"  # model_config: the digest of the prompts it was logged with (registry.py)
BACKBONE_ARTIFACT = "backbone_config"
IMAGE_COLUMN = "image"
PROB_PREFIX = "prob_"
DEFAULT_BATCH_SIZE = 64


def _to_pil(value: Any) -> Image.Image:
    """One image from a path, bytes, base64 text, a PIL image or an HxWx3 uint8 array."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        return Image.fromarray(value.astype(np.uint8)).convert("RGB")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(value))).convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        if os.path.isfile(value):
            with Image.open(value) as image:
                return image.convert("RGB")
        try:
            data = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image {str(value)[:80]!r} is neither an existing file nor base64 image bytes") from None
        return Image.open(io.BytesIO(data)).convert("RGB")
    raise ValueError(f"cannot read an image from a {type(value).__name__}; give a path, bytes or an array")


def _read_image(index: int, value: Any, count: int) -> Image.Image:
    """Image ``index`` of a request; an unreadable one is the client's error: ``MlflowException`` with
    ``INVALID_PARAMETER_VALUE``, which the scoring server answers with HTTP 400 and this one-line message."""
    from mlflow.exceptions import MlflowException

    try:
        return _to_pil(value)
    except UnidentifiedImageError:  # its message names a BytesIO object, which tells the client nothing
        reason = "its bytes are not an image format PIL reads (JPEG, PNG, TIFF, ...)"
    except (ValueError, OSError) as err:  # a truncated image, a bad path or base64
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    message = f"image {index + 1} of {count} is not readable: {reason}"
    raise MlflowException.invalid_parameter_value(message) from None


class CoOpClassifier(PythonModel):
    """CLIP with learned prompts (CoOp, KgCoOp, ProGrad or CoCoOp): images -> class names and probabilities."""

    # MLflow wraps a PythonModel's ``predict`` for type-hint validation when the class is defined, and warns on every
    # console that saves, loads or serves the model that ``predict`` has no type hints. This model's input is
    # declared by its registered signature instead (type hints would switch MLflow to its type-hint schema, which
    # takes {"inputs": ...} requests only). No public switch turns the check off; MLflow's own ChatModel classes skip
    # it with this private attribute (mlflow/pyfunc/model.py, PythonModel.__init_subclass__). On an MLflow upgrade,
    # check that saving the model prints no such warning and that predict still gets the DataFrame.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from coop_core import (
            PromptFileError,
            check_prompts_fit,
            load_clip,
            load_prompts,
            prompt_digest,
            prompt_model,
            test_transform,
            text_tower,
        )

        config = dict(context.model_config or {})
        ctx, meta = load_prompts(context.artifacts[PROMPTS_ARTIFACT])  # verifies the file's own sha256
        expected = config.get(PROMPTS_SHA256_KEY)
        if expected and prompt_digest(ctx, meta.to_header(), meta.learned) != expected:
            raise PromptFileError(f"the prompts artifact is not the one this model was logged with (sha256 "
                                  f"{expected[:12]}...); refusing it, re-register the model")
        backbone = context.artifacts.get(BACKBONE_ARTIFACT) or meta.backbone
        pretrained = config.get("pretrained") or meta.pretrained
        self.device = torch.device(config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        clip = load_clip(backbone, pretrained, device=self.device)
        # Refused before the model is built: a context of another backbone's width would otherwise fail in a copy.
        width = text_tower(clip.model).token_embedding.weight.shape[1]
        check_prompts_fit(ctx, meta, meta.classnames, (*meta.expected_shape(), width))
        # the method's model (CoCoOp's carries its meta-net: its prompts are built per image at predict time)
        model = prompt_model(clip, ctx, meta.prompt, meta.classnames, meta.classnames, self.device,
                             method=meta.method, learned=meta.learned)
        with torch.no_grad():  # a CoOp-style model's class features are fixed: computed once
            self.text_features = None if model.conditional else model.text_features().float()  # (n_cls, d)
        model.eval()
        self.model = model
        self.classnames = list(meta.classnames)
        self.preprocess = test_transform(clip.image_size, clip.mean, clip.std)

    def _pixels(self, model_input: Any) -> torch.Tensor:
        """A preprocessed batch ``(n, 3, S, S)`` from any accepted input."""
        if isinstance(model_input, np.ndarray) and model_input.ndim == 4 and model_input.shape[1] == 3 and (
            np.issubdtype(model_input.dtype, np.floating)
        ):
            return torch.from_numpy(model_input).float()  # already preprocessed
        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
            values = list(model_input)  # (n, H, W, 3) raw images
        elif isinstance(model_input, pd.DataFrame):
            if model_input.shape[1] == 0:
                raise ValueError(f"input DataFrame has no columns; put images in an {IMAGE_COLUMN!r} column")
            column = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
            values = list(model_input[column])
        elif isinstance(model_input, pd.Series):
            values = list(model_input)
        elif isinstance(model_input, (list, tuple)):
            values = list(model_input)
        else:
            raise ValueError(
                f"unsupported input {type(model_input).__name__}: give a DataFrame with an {IMAGE_COLUMN!r} column "
                "of paths or bytes, or a numpy image batch"
            )
        if not values:
            return torch.empty(0, 3, 1, 1)
        images = [_read_image(i, v, len(values)) for i, v in enumerate(values)]
        return torch.stack([self.preprocess(image) for image in images])  # (n, 3, S, S)

    @torch.no_grad()
    def probabilities(self, model_input: Any) -> np.ndarray:
        """Class probabilities ``(n, n_cls)``."""
        pixels = self._pixels(model_input)
        out = [np.zeros((0, len(self.classnames)), dtype=np.float32)]
        for chunk in pixels.split(self.batch_size):
            feats = self.model.encode_images(chunk.to(self.device))  # (b, d)
            if self.text_features is None:  # CoCoOp: each image's own prompts through the meta-net
                logits = self.model.forward_features(feats)  # (b, n_cls)
            else:
                logits = self.model.logits(feats, self.text_features)  # (b, n_cls)
            out.append(logits.float().softmax(dim=-1).cpu().numpy())
        return np.concatenate(out)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        probs = self.probabilities(model_input)
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        frame = {
            "class_name": [self.classnames[i] for i in best],
            "probability": probs[np.arange(len(probs)), best].astype(float),
        }
        for c, name in enumerate(self.classnames):
            frame[PROB_PREFIX + name] = probs[:, c].astype(float)
        return pd.DataFrame(frame)


mlflow.models.set_model(CoOpClassifier())
