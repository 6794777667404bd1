"""Model tests never touch the network: hub and URL downloads raise unless file:// URLs."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import huggingface_hub
import open_clip.pretrained
import pytest

from dask_imgcurator.models import ClipRef, make_tiny_model_dir


class NetworkUsed(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkUsed(f"network access attempted in a test: {args} {kwargs}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("IMGCURATOR_OFFLINE", raising=False)
    monkeypatch.setenv("IMGCURATOR_HOME", str(tmp_path / "imgcurator_home"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _refuse)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", _refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", _refuse)
    real_urlopen = urllib.request.urlopen

    def local_only_urlopen(url, *args, **kwargs):
        if not str(getattr(url, "full_url", url)).startswith("file:"):
            _refuse(url)
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", local_only_urlopen)


@pytest.fixture
def tiny(tmp_path: Path) -> ClipRef:
    """A tiny random CLIP (32-d, 32 px) with heads, in a fresh model dir."""
    return make_tiny_model_dir(tmp_path / "models")


class Payload:
    """Pickles to a call of os.system that creates ``marker`` when unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
