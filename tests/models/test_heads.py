from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from dask_imgcurator.models import (
    AestheticHead,
    ClipRef,
    HeadSpec,
    NsfwHead,
    UnsafeWeightsError,
    WeightsNotFoundError,
    heads,
    load_head,
    register_head,
)
from dask_imgcurator.models.heads import adapt_state_dict

from .conftest import Payload

AESTHETIC_SHAPES = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
NSFW_SHAPES = [(64, 768), (512, 64), (256, 512), (1, 256)]


def _linears(shapes: list[tuple[int, int]], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(o, i, generator=g) / i**0.5, torch.randn(o, generator=g)) for o, i in shapes]


def _original_aesthetic_state(seed: int = 0) -> OrderedDict:
    """Keys and shapes of sac+logos+ava1-l14-linearMSE.pth."""
    state = OrderedDict()
    for index, (w, b) in zip((0, 2, 4, 6, 7), _linears(AESTHETIC_SHAPES, seed), strict=True):
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = w, b
    return state


def _original_nsfw_state(seed: int = 0) -> OrderedDict:
    """Keys and shapes of clip_autokeras_binary_nsfw.pth."""
    g = torch.Generator().manual_seed(seed + 100)
    state = OrderedDict(
        [
            ("norm.mean", torch.randn(768, generator=g) * 0.1),
            ("norm.variance", torch.rand(768, generator=g) + 0.5),
        ]
    )
    for n, (w, b) in enumerate(_linears(NSFW_SHAPES, seed), start=1):
        state[f"linear_{n}.weight"], state[f"linear_{n}.bias"] = w, b
    return state


def _embeddings(n: int = 5, dim: int = 768) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(7)), dim=-1)


def _place(state: dict, model_dir: Path, head: str, suffix: str = ".pth") -> Path:
    path = model_dir / "heads" / head / f"ViT-L-14-openai{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_aesthetic_from_original_pth_matches_plain_math(tmp_path: Path) -> None:
    state = _original_aesthetic_state()
    _place(state, tmp_path, "aesthetic")
    head = load_head("aesthetic", 768, "ViT-L-14-openai", model_dir=str(tmp_path))
    x = _embeddings()
    expected = x
    for index in (0, 2, 4, 6, 7):  # linear layers only; dropout is identity at inference
        expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    out = head(x)
    assert out.shape == (5,) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.squeeze(1))


def test_nsfw_with_normalisation_matches_plain_math(tmp_path: Path) -> None:
    state = _original_nsfw_state()
    _place(state, tmp_path, "nsfw")
    head = load_head("nsfw", 768, "ViT-L-14-openai", model_dir=str(tmp_path))
    x = _embeddings()
    h = (x - state["norm.mean"]) / state["norm.variance"].sqrt()
    for n in (1, 2, 3):
        h = torch.relu(h @ state[f"linear_{n}.weight"].T + state[f"linear_{n}.bias"])
    expected = torch.sigmoid(h @ state["linear_4.weight"].T + state["linear_4.bias"]).squeeze(1)
    out = head(x)
    torch.testing.assert_close(out, expected)
    assert ((out >= 0) & (out <= 1)).all()


def test_other_key_names_and_buffer_shapes_are_mapped() -> None:
    original = _original_nsfw_state()
    renamed = OrderedDict(
        [
            ("model.normalization.mean", original["norm.mean"][None]),
            ("model.normalization.var", original["norm.variance"][None]),
        ]
        + [(f"model.fc{n}.{p}", original[f"linear_{n}.{p}"]) for n in range(1, 5) for p in ("weight", "bias")]
    )
    head = NsfwHead()
    head.load_state_dict(adapt_state_dict(renamed, head, "test"))
    for key, value in original.items():
        assert torch.equal(head.state_dict()[key], value)


def test_unmappable_weights_list_expected_and_found_keys() -> None:
    state = _original_aesthetic_state()
    del state["layers.7.bias"]
    with pytest.raises(ValueError) as err:
        adapt_state_dict(state, AestheticHead(), "aesthetic head x.pth")
    text = str(err.value)
    assert "cannot map the weights of aesthetic head x.pth" in text
    assert "expected:\n  layers.0.weight (1024, 768)" in text and "found:\n" in text
    assert text.count("layers.7.bias") == 1


def test_wrong_width_embeddings_name_both_widths(tmp_path: Path) -> None:
    _place(_original_aesthetic_state(), tmp_path, "aesthetic")
    head = load_head("aesthetic", 768, "ViT-L-14-openai", model_dir=str(tmp_path))
    message = (
        "aesthetic head expects 768-d embeddings (ViT-L-14-openai) but got 512-d; "
        "use a matching CLIP model or head"
    )
    with pytest.raises(ValueError) as err:
        head(torch.zeros(2, 512))
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        load_head("aesthetic", 512, "ViT-L-14-openai", model_dir=str(tmp_path))
    assert str(err.value) == message


def test_heads_take_their_input_width() -> None:
    x = _embeddings(3, 512)
    assert NsfwHead(512, "ViT-B-32-openai")(x).shape == (3,)
    assert AestheticHead(512)(x).shape == (3,)


def test_malicious_head_weights_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _place({"layers.0.weight": Payload(marker)}, tmp_path, "aesthetic")
    with pytest.raises(UnsafeWeightsError, match=r"refusing to load .*ViT-L-14-openai\.pth"):
        load_head("aesthetic", 768, "ViT-L-14-openai", model_dir=str(tmp_path))
    assert not marker.exists()


def test_missing_head_offline_explains_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as err:
        load_head("nsfw", 768, "ViT-L-14-openai", model_dir=str(tmp_path))
    text = str(err.value)
    assert "LAION CLIP-based NSFW detector" in text
    assert str(tmp_path / "heads" / "nsfw" / "ViT-L-14-openai") in text
    assert "imgcurator models download --model-dir DIR" in text


def test_head_without_known_source(tiny: ClipRef, tmp_path: Path) -> None:
    ref = ClipRef("ViT-B-32", "openai", model_dir=str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="No download source is known"):
        load_head("aesthetic", 512, ref.head_family, **ref.store_kwargs())


def test_tiny_heads_load_through_the_store(tiny: ClipRef) -> None:
    model = tiny.load()
    emb = model.encode(torch.randn(3, 3, 32, 32))
    aesthetic = load_head("aesthetic", model.embed_dim, tiny.head_family, **tiny.store_kwargs())(emb)
    nsfw = load_head("nsfw", model.embed_dim, tiny.head_family, **tiny.store_kwargs())(emb)
    assert aesthetic.shape == nsfw.shape == (3,)
    assert ((aesthetic > 3) & (aesthetic < 7)).all() and ((nsfw > 0) & (nsfw < 1)).all()


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)  # (N, 1): load_head flattens it


def _mean_head(in_dim: int, **where: object) -> nn.Module:
    return _Mean()


def test_custom_head_registration_and_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "_REGISTRY", dict(heads._REGISTRY))
    spec = register_head("mean-score", _mean_head)
    assert pickle.loads(pickle.dumps(spec)) == spec
    x = _embeddings(4, 16)
    for head in ("mean-score", spec, HeadSpec("mean-score", _mean_head)):
        out = load_head(head, 16, "my-encoder")(x)
        assert out.shape == (4,) and out.dtype == torch.float32
        torch.testing.assert_close(out, x.mean(dim=1))
    with pytest.raises(ValueError, match=r"unknown head 'nope'; registered heads: .*aesthetic"):
        load_head("nope", 16, "my-encoder")


def test_heads_are_cached_per_key(tmp_path: Path) -> None:
    _place(_original_aesthetic_state(), tmp_path, "aesthetic")

    def load(device: str = "cpu") -> nn.Module:
        return load_head("aesthetic", 768, "ViT-L-14-openai", model_dir=str(tmp_path), device=device)

    assert load() is load() and load("meta") is not load()


class _Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.full((len(e),), self.value)


def _one_head(in_dim: int, **store) -> nn.Module:
    return _Constant(1.0)


def _two_head(in_dim: int, **store) -> nn.Module:
    return _Constant(2.0)


def test_replaced_head_factory_is_not_served_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "_REGISTRY", dict(heads._REGISTRY))
    x = _embeddings(2, 4)
    first = register_head("replaced", _one_head)
    assert load_head(first, 4, "enc")(x).tolist() == [1.0, 1.0]
    second = register_head("replaced", _two_head)
    assert load_head(second, 4, "enc")(x).tolist() == [2.0, 2.0]
    assert load_head("replaced", 4, "enc")(x).tolist() == [2.0, 2.0]
    assert load_head(first, 4, "enc") is load_head(first, 4, "enc")


def _fixed_width_head(in_dim: int, **store) -> nn.Module:
    return nn.Linear(768, 1)  # ignores in_dim


def _function_head(in_dim: int, **store):
    return lambda e: e.sum(dim=1)


def _no_head(in_dim: int, **store):
    return None


def test_custom_head_of_another_width_names_both_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "_REGISTRY", dict(heads._REGISTRY))
    head = load_head(register_head("fixed-768", _fixed_width_head), 32, "tiny")
    with pytest.raises(ValueError, match=r"head 'fixed-768' expects 768-d embeddings but got 32-d"):
        head(_embeddings(2, 32))


def test_head_factory_returning_a_function_works_and_none_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heads, "_REGISTRY", dict(heads._REGISTRY))
    x = _embeddings(3, 8)
    torch.testing.assert_close(load_head(register_head("summed", _function_head), 8, "enc")(x), x.sum(dim=1))
    with pytest.raises(TypeError, match=r"head 'nothing': its factory returned NoneType, expected an nn.Module"):
        load_head(register_head("nothing", _no_head), 8, "enc")
