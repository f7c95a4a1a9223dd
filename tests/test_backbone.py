"""Loading a frozen CLIP: from a config JSON, with random, local or (offline) missing pretrained weights."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch
from PIL import Image

from coop_core.backbone import LoadedClip, WeightsDownloadError, WeightsUnavailableError, load_clip, weights_digest

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_from_config_json_gives_a_frozen_model_and_what_coop_needs(tiny_vit_config):
    clip = load_clip(tiny_vit_config, "none")
    assert isinstance(clip, LoadedClip)
    assert clip.model_name == "tiny-vit" and clip.pretrained == "none"
    assert clip.image_size == 32
    assert clip.mean == open_clip.OPENAI_DATASET_MEAN and clip.std == open_clip.OPENAI_DATASET_STD
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert clip.tokenizer(["a photo of a forest."]).shape == (1, 77)
    assert clip.preprocess_val(Image.new("RGB", (64, 48))).shape == (3, 32, 32)


def test_resnet_config_loads_too(tiny_rn_config):
    clip = load_clip(tiny_rn_config, "none")
    assert type(clip.model.visual).__name__ == "ModifiedResNet"
    assert clip.model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 32)


def test_random_weights_are_identical_across_loads_and_leave_the_global_rng_alone(tiny_vit_config):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = load_clip(tiny_vit_config, "none")
    assert torch.equal(torch.rand(3), expected_draw)
    torch.manual_seed(999)  # a different global seed does not change "none" weights
    b = load_clip(tiny_vit_config, "random")
    assert _same_weights(a.model, b.model)


def test_weights_digest_names_the_weights_not_where_they_came_from(tiny_vit_config, tmp_path):
    random_weights = load_clip(tiny_vit_config, "none").model
    digest = weights_digest(random_weights)
    assert len(digest) == 64 and digest == weights_digest(load_clip(tiny_vit_config, "none").model)
    path = tmp_path / "copy-of-random.pt"  # the same weights through a checkpoint file: the same CLIP
    torch.save(random_weights.state_dict(), path)
    assert weights_digest(load_clip(tiny_vit_config, str(path)).model) == digest
    with torch.no_grad():
        random_weights.logit_scale.add_(1e-3)  # one scalar changed (a 0-d tensor): another CLIP
    assert weights_digest(random_weights) != digest


def test_unknown_architecture_and_missing_config(tmp_path):
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'ViT-Z-99'.*list_models"):
        load_clip("ViT-Z-99", "none")
    with pytest.raises(FileNotFoundError, match="model-config JSON not found"):
        load_clip(str(tmp_path / "missing.json"), "none")


@pytest.mark.parametrize("name", ["/nonexistent/dir/ViT-B-16.pt", "ViT-B-16.pt", "weights.safetensors"])
def test_missing_checkpoint_file_is_weights_unavailable(tiny_vit_config, name):
    with pytest.raises(WeightsUnavailableError, match="checkpoint file not found"):
        load_clip(tiny_vit_config, name)


def test_unknown_pretrained_tag_lists_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match=r"no pretrained tag 'not_a_tag' for RN50; known tags: .*openai"):
        load_clip("RN50", "not_a_tag")


def test_pretrained_tag_without_network_fails_fast_with_one_actionable_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("RN50", "openai", cache_dir=str(tmp_path / "cache"), download_timeout_s=3)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert "RN50/openai" in message and "pass --pretrained /path/to/checkpoint.pt" in message
    # Not random weights for RN50 (every image encoded by a random RN50, for nothing): the platform's launch path
    # offers its tiny smoke backbone instead (tests/platform/test_train_ddp.py).
    assert "--pretrained none" not in message and isinstance(info.value, WeightsDownloadError)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained network traceback


def test_local_checkpoint_file_is_loaded_exactly(tiny_vit_config, tmp_path):
    open_clip.add_model_config(tiny_vit_config)
    torch.manual_seed(5)
    trained = open_clip.create_model("tiny-vit")
    with torch.no_grad():
        trained.logit_scale.fill_(4.2)  # not an initial value
    path = tmp_path / "tiny-vit.pt"
    torch.save(trained.state_dict(), path)

    loaded = load_clip(tiny_vit_config, str(path))
    assert loaded.pretrained == str(path)
    assert _same_weights(loaded.model, trained)
    assert not _same_weights(loaded.model, load_clip(tiny_vit_config, "none").model)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_checkpoint_of_another_architecture_is_refused_with_one_line(tiny_vit_config, tiny_rn_config, tmp_path):
    from coop_core.backbone import CheckpointMismatchError

    rn = tmp_path / "tiny-rn.pt"
    torch.save(load_clip(tiny_rn_config, "none").model.state_dict(), rn)
    with pytest.raises(CheckpointMismatchError) as info:
        load_clip(tiny_vit_config, str(rn))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {rn} does not fit the architecture tiny-vit: ")
    assert "weights missing (e.g. visual." in message and "pass the --backbone it was trained with" in message
    # Same architecture, another width: named with both shapes.
    vit = load_clip(tiny_vit_config, "none").model.state_dict()
    vit["visual.proj"] = torch.zeros(64, 16)
    torch.save(vit, tmp_path / "narrow.pt")
    with pytest.raises(CheckpointMismatchError, match=r"1 of another shape \(e.g. visual.proj: \(64, 16\) in the "
                                                      r"file, \(64, 32\) in tiny-vit\)"):
        load_clip(tiny_vit_config, str(tmp_path / "narrow.pt"))


def test_a_file_that_is_not_a_safe_checkpoint_is_refused_without_unpickling(tiny_vit_config, tmp_path):
    import pickle

    from coop_core.backbone import CheckpointMismatchError

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointMismatchError, match=r"cannot read checkpoint .*garbage.pt: not a safetensors or "
                                                      r"PyTorch state-dict file"):
        load_clip(tiny_vit_config, str(tmp_path / "garbage.pt"))
    flag = tmp_path / "code-ran"

    class Evil:  # unpickling this would run code: weights_only=True must refuse it
        def __reduce__(self):
            return (open, (str(flag), "w"))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"visual.proj": Evil()}, fh)
    with pytest.raises(CheckpointMismatchError, match="refused"):
        load_clip(tiny_vit_config, str(tmp_path / "evil.pt"))
    assert not flag.exists()
