from __future__ import annotations

import pytest

from dask_imgcurator.decode.base import PreprocessSpec
from dask_imgcurator.models import ClipRef, as_model_source, custom_model


def _identity():
    return lambda pixels: pixels


def test_text_is_parsed_with_storage_settings() -> None:
    source = as_model_source("ViT-B-32/openai", model_dir="/models", offline=True)
    assert source == ClipRef("ViT-B-32", "openai", model_dir="/models", offline=True)
    assert source.head_family == "ViT-B-32-openai"
    assert source.store_kwargs() == {"model_dir": "/models", "cache_dir": None, "offline": True}


def test_settings_only_fill_what_the_model_leaves_unset() -> None:
    ref = ClipRef(model_dir="/mine")
    assert as_model_source(ref, model_dir="/other", cache_dir="/cache") == ClipRef(
        model_dir="/mine", cache_dir="/cache"
    )
    custom = custom_model(_identity, PreprocessSpec(size=8), embed_dim=3, name="identity")
    filled = as_model_source(custom, model_dir="/models")
    assert filled.model_dir == "/models" and filled.head_family == "identity"
    assert filled.store_kwargs()["model_dir"] == "/models"


def test_other_objects_are_rejected() -> None:
    with pytest.raises(TypeError, match="expected model text, a ClipRef or a custom_model"):
        as_model_source(object())
