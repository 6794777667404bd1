from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
from torch import nn

from dask_imgcurator.decode.base import PreprocessSpec
from dask_imgcurator.models import CustomModel, custom_model

BUILDS: list[int] = []


class _ColourMoments(nn.Module):
    """Deterministic stand-in encoder: per-channel mean and std -> 6-d features."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3))], dim=1)


def _factory() -> nn.Module:
    BUILDS.append(1)
    return _ColourMoments()


def _plain_function_factory():
    return lambda pixels: pixels.mean(dim=(2, 3))


def test_custom_model_embeds_normalised_and_builds_once() -> None:
    spec = PreprocessSpec(size=16)
    model = custom_model(_factory, spec, embed_dim=6, name="colour-moments")
    assert isinstance(model, CustomModel) and model.info().preprocess == spec
    assert pickle.loads(pickle.dumps(model)) == model  # only the factory travels, not a module
    BUILDS.clear()
    loaded = model.load()
    assert model.load() is loaded and BUILDS == [1]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = nn.functional.normalize(_ColourMoments()(x), dim=-1)
    torch.testing.assert_close(loaded.encode(x), expected)
    assert loaded.embed_dim == 6 and loaded.preprocess == spec


def test_custom_model_accepts_open_clip_transforms() -> None:
    transform = open_clip.image_transform(64, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    model = custom_model(_factory, transform, embed_dim=6, name="colour-moments-64")
    assert model.preprocess == PreprocessSpec(
        size=64, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic"
    )


def test_plain_function_in_bf16_uses_autocast() -> None:
    model = custom_model(_plain_function_factory, PreprocessSpec(size=8), embed_dim=3, name="channel-means")
    x = torch.rand(2, 3, 8, 8)
    out = model.load(precision="bf16").encode(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nn.functional.normalize(x.mean(dim=(2, 3)), dim=-1), atol=1e-2, rtol=1e-2)


def test_wrong_output_width_is_reported() -> None:
    model = custom_model(_factory, PreprocessSpec(size=8), embed_dim=5, name="wrong-width")
    with pytest.raises(ValueError, match=r"returned shape \(2, 6\), expected \(2, 5\)"):
        model.load().encode(torch.rand(2, 3, 8, 8))


def _negated_factory():
    return lambda pixels: -pixels.mean(dim=(2, 3))


def test_same_name_with_another_factory_or_preprocess_is_not_served_from_the_cache() -> None:
    x = torch.rand(2, 3, 8, 8)
    first = custom_model(_plain_function_factory, PreprocessSpec(size=8), embed_dim=3, name="reused")
    negated = custom_model(_negated_factory, PreprocessSpec(size=8), embed_dim=3, name="reused")
    resized = custom_model(_plain_function_factory, PreprocessSpec(size=16), embed_dim=3, name="reused")
    torch.testing.assert_close(negated.load().encode(x), -first.load().encode(x))
    assert resized.load().preprocess.size == 16 and first.load().preprocess.size == 8
    assert first.load() is first.load()
