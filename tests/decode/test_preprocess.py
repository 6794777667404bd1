"""PreprocessSpec from open_clip models/transforms, and the resize + crop geometry."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import open_clip
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from open_clip.transform import PreprocessCfg, image_transform_v2
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, v2
from torchvision.transforms import functional as F

from dask_imgcurator.decode import PreprocessSpec, preprocess_spec_from_open_clip
from dask_imgcurator.decode.preprocess import crop_box, crop_offset, resized_size

SIGLIP = {"size": 256, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}


def test_from_real_model_and_its_transform(caplog):
    caplog.set_level(logging.ERROR)  # "no pretrained weights" warning
    model, _, transform = open_clip.create_model_and_transforms("ViT-S-32")
    want = PreprocessSpec(size=224, interpolation="bicubic")
    assert preprocess_spec_from_open_clip(model) == want
    assert preprocess_spec_from_open_clip(transform) == want


@pytest.mark.parametrize("wrap", [dict, lambda cfg: SimpleNamespace(visual=SimpleNamespace(preprocess_cfg=cfg))])
def test_from_cfg(wrap):
    spec = preprocess_spec_from_open_clip(wrap(dict(SIGLIP, resize_mode="shortest", size=(256, 256))))
    assert spec == PreprocessSpec(size=256, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")


def test_from_open_clip_transforms_matches_cfg():
    transform = image_transform_v2(PreprocessCfg(**SIGLIP), is_train=False)
    assert preprocess_spec_from_open_clip(transform) == preprocess_spec_from_open_clip(SIGLIP)


def test_legacy_model_attributes():
    visual = SimpleNamespace(image_size=336, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    spec = preprocess_spec_from_open_clip(SimpleNamespace(visual=visual))
    assert spec == PreprocessSpec(size=336, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bicubic")


def test_torchvision_v2_compose():
    transform = v2.Compose(
        [
            v2.Resize(192, interpolation=InterpolationMode.BILINEAR),
            v2.CenterCrop(192),
            v2.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    spec = preprocess_spec_from_open_clip(transform)
    assert spec == PreprocessSpec(size=192, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bilinear")


@pytest.mark.parametrize("resize_mode", ["squash", "longest"])
def test_other_resize_modes_are_refused(resize_mode):
    cfg = dict(SIGLIP, resize_mode=resize_mode)
    with pytest.raises(ValueError, match=f"resize_mode '{resize_mode}' is not supported"):
        preprocess_spec_from_open_clip(cfg)
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    with pytest.raises(ValueError, match="squashes|exactly one Resize"):  # longest: open_clip's own resizer
        preprocess_spec_from_open_clip(transform)


@pytest.mark.parametrize(
    "transform, message",
    [
        (Compose([Resize(256), CenterCrop(224), Normalize([0.5] * 3, [0.5] * 3)]), "sides must match"),
        (Compose([Resize((224, 224)), CenterCrop(224), Normalize([0.5] * 3, [0.5] * 3)]), "squashes"),
        (Compose([Resize(224), CenterCrop(224)]), "exactly one Normalize"),
        (
            Compose([Resize(224, interpolation=InterpolationMode.NEAREST), CenterCrop(224), Normalize(0, 1)]),
            "interpolation 'nearest' is not supported",
        ),
    ],
)
def test_unsupported_transforms(transform, message):
    with pytest.raises(ValueError, match=message):
        preprocess_spec_from_open_clip(transform)


def test_non_square_size_is_refused():
    with pytest.raises(ValueError, match="non-square"):
        preprocess_spec_from_open_clip(dict(SIGLIP, size=(224, 320)))


def test_unrecognised_object():
    with pytest.raises(ValueError, match="cannot find preprocessing"):
        preprocess_spec_from_open_clip(object())


@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([64, 224, 256]))
def test_resized_size_matches_torchvision(width, height, size):
    image = torch.empty(1, height, width, device="meta")  # shapes only, no memory
    new_h, new_w = F.resize(image, size).shape[1:]
    assert resized_size(width, height, size) == (new_w, new_h)
    box = crop_box(width, height, size)
    assert box[2] - box[0] == pytest.approx(size * width / new_w)
    assert box[3] - box[1] == pytest.approx(size * height / new_h)


@given(st.integers(64, 700), st.integers(64, 700), st.sampled_from([64, 224]))
def test_crop_offset_matches_torchvision(width, height, size):
    assume(min(width, height) >= size)
    positions = torch.arange(width * height).view(1, height, width)
    corner = int(F.center_crop(positions, size)[0, 0, 0])
    assert crop_offset(width, height, size) == (corner % width, corner // width)
