"""Loading a frozen CLIP through open_clip's public API.

Three ways to name the weights:
- an open_clip pretrained tag (``ViT-B-16`` + ``openai``), downloaded to open_clip's cache by users with internet;
- a local checkpoint file (``--pretrained /path/to/ViT-B-16.pt``);
- ``none``: random weights, for offline smoke runs and benchmarks (speed does not depend on weight values).

The architecture is an open_clip model name or a path to an open_clip model-config JSON (registered with
``open_clip.add_model_config``, keyed by the file stem).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

logger = logging.getLogger(__name__)

NO_WEIGHTS = ("none", "random", "")
RANDOM_WEIGHTS_SEED = 0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (no network and nothing cached). The message is one actionable line."""


class WeightsDownloadError(WeightsUnavailableError):
    """A pretrained tag's weights could not be downloaded (no network, or the hub refused) and none are cached."""


class CheckpointMismatchError(ValueError):
    """A local checkpoint is not a state dict of the requested architecture (or not a checkpoint at all).

    The message is one line: which weights are missing, unexpected or of another shape, and what to pass instead.
    """


@dataclass
class LoadedClip:
    """A frozen CLIP with everything CoOp needs from it.

    model: the open_clip model in eval mode with ``requires_grad=False`` everywhere.
    tokenizer: open_clip's tokenizer for this architecture.
    preprocess_val: open_clip's test transform (resize + centre crop + CLIP normalisation).
    image_size / mean / std: what the transforms need.
    model_name: the resolved open_clip architecture name; pretrained: the weights spec as given.
    """

    model: nn.Module
    tokenizer: Callable
    preprocess_val: Callable
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_name: str
    pretrained: str


def resolve_model_name(backbone: str) -> str:
    """Return an open_clip model name for ``backbone``, registering a model-config JSON path when given one."""
    path = Path(backbone)
    if backbone.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"model-config JSON not found: {backbone}")
        open_clip.add_model_config(path)
        return path.stem
    if backbone not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {backbone!r}; use one of open_clip.list_models() (e.g. ViT-B-16, RN50) "
            "or a path to a model-config JSON"
        )
    return backbone


def text_dims(backbone: str) -> tuple[int, int, int]:
    """(width, layers, context length) of ``backbone``'s text transformer, from its open_clip config (no weights)."""
    cfg = open_clip.get_model_config(resolve_model_name(backbone))
    if cfg is None:
        raise ValueError(f"no open_clip model config for {backbone!r}")
    text = cfg.get("text_cfg", {})
    return int(text.get("width", 512)), int(text.get("layers", 12)), int(text.get("context_length", 77))


def _download_host_reachable(cfg: dict, timeout_s: float) -> bool:
    """One short TCP probe of the host the weights come from.

    huggingface_hub retries a failed request several times with back-off (about a minute offline); a probe decides in
    at most ``timeout_s`` whether to try the network at all or to use the local cache only.
    """
    if cfg.get("hf_hub"):
        import huggingface_hub.constants as hub_constants

        url = urlparse(hub_constants.ENDPOINT)
    else:
        url = urlparse(cfg.get("url", ""))
    if not url.hostname:
        return True
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        logger.debug("%s is unreachable: looking for cached weights only", url.hostname)
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Put huggingface_hub in cache-only mode for the duration (it reads the flag at call time)."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _ensure_weights(model_name: str, pretrained: str, cache_dir: str | None, timeout_s: float) -> str:
    """Resolve ``pretrained`` to a local checkpoint path, downloading a tag with a short network timeout.

    Raises:
        WeightsUnavailableError: the tag is unknown for this architecture or cannot be downloaded.
    """
    if os.path.isfile(pretrained):
        return pretrained
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise WeightsUnavailableError(f"checkpoint file not found: {pretrained}")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise WeightsUnavailableError(
            f"no pretrained tag {pretrained!r} for {model_name}; known tags: {', '.join(tags) or 'none'}; "
            "or pass a local checkpoint path, or 'none' for random weights"
        )
    offline = not _download_host_reachable(cfg, timeout_s)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    env_backup = {k: os.environ.get(k) for k in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")}
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout_s)))
    try:
        with _hub_offline(offline):
            path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as err:  # network errors come in many types (socket, requests, huggingface_hub)
        raise WeightsDownloadError(
            f"cannot download pretrained weights {model_name}/{pretrained} ({type(err).__name__}); "
            f"download them where there is internet and pass --pretrained /path/to/checkpoint.pt, "
            f"or pre-populate the open_clip/Hugging Face cache"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
        for key, value in env_backup.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not path:
        raise WeightsUnavailableError(f"open_clip returned no file for {model_name}/{pretrained}")
    return path


def _asked_for_random_weights(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded for model")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read safely: safetensors, or ``torch.load(weights_only=True)`` (no pickled code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"holds a {type(checkpoint).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def describe_checkpoint_mismatch(model_name: str, path: str, err: BaseException) -> str:
    """One line saying why the checkpoint at ``path`` does not load into ``model_name`` (after open_clip failed)."""
    try:
        found = _read_state_dict(path)
    except Exception as read_err:  # not a checkpoint, or one holding pickled objects weights_only refuses
        reason = str(read_err).strip().splitlines()[0] if str(read_err).strip() else type(read_err).__name__
        return (f"cannot read checkpoint {path}: not a safetensors or PyTorch state-dict file, or it holds pickled "
                f"objects besides tensors, which are refused ({reason[:200]}); pass a state-dict checkpoint of "
                f"{model_name}")
    with torch.random.fork_rng(devices=[]):
        expected = {k: v.shape for k, v in open_clip.create_model(model_name).state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k]))
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(found[k].shape)} in the file, "
                     f"{tuple(expected[k])} in {model_name})")
    detail = "; ".join(parts) or (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return (f"checkpoint {path} does not fit the architecture {model_name}: {detail}; pass the --backbone it was "
            "trained with, or the checkpoint of this backbone")


def weights_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s parameters and buffers (name, dtype, shape and bytes of each): which CLIP this is.

    Two runs share a digest exactly when their CLIPs compute the same function, however the weights arrived: an
    open_clip tag, a checkpoint file (renamed, copied or re-downloaded), or ``none``'s seeded random weights. The
    registry's champion rule compares runs only under the same digest. Hashing ViT-B/16 takes about a second.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().reshape(-1)  # 1-D (a 0-d tensor has no byte view), contiguous
        h.update(f"{name}\t{t.dtype}\t{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_clip(
    backbone: str,
    pretrained: str = "openai",
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    download_timeout_s: float = 10.0,
) -> LoadedClip:
    """Load a frozen open_clip CLIP.

    Args:
        backbone: open_clip architecture name or model-config JSON path.
        pretrained: pretrained tag, checkpoint path, or "none" for random weights.
        device: where to put the model.
        cache_dir: open_clip download cache.
        download_timeout_s: network timeout for a tag download; offline this fails fast with one line.

    Returns:
        The frozen model, its tokenizer and test transform.

    Raises:
        WeightsUnavailableError: the weights cannot be found or downloaded.
        CheckpointMismatchError: a checkpoint file that is not a state dict of ``backbone``.
    """
    model_name = resolve_model_name(backbone)
    weights = None if pretrained.lower() in NO_WEIGHTS else _ensure_weights(
        model_name, pretrained, cache_dir, download_timeout_s
    )
    root = logging.getLogger()
    # Random weights were asked for by name: open_clip's warning that none were loaded says nothing new (our own
    # "loaded <model> (none)" line follows), and every Ray worker would print it.
    if weights is None:
        root.addFilter(_asked_for_random_weights)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)  # "none" gives the same random weights in every process
            try:
                # open_clip reads the file with torch.load(weights_only=True) or safetensors: no pickled code runs.
                model, _, preprocess_val = open_clip.create_model_and_transforms(
                    model_name, pretrained=weights, device=device, cache_dir=cache_dir
                )
            except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as err:
                if weights is None:
                    raise
                raise CheckpointMismatchError(describe_checkpoint_mismatch(model_name, weights, err)) from None
    finally:
        root.removeFilter(_asked_for_random_weights)
    model.eval()
    model.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    size = pp.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    logger.info("loaded %s (%s) on %s", model_name, pretrained, device)
    return LoadedClip(model, tokenizer, preprocess_val, int(size), mean, std, model_name, pretrained)
