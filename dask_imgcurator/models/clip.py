"""CLIP image encoders: find or download weights, save them as open_clip local dirs, load them."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from safetensors.torch import save

from .cache import get_cached
from .. import config
from .encoder import LoadedModel, ModelInfo, OneDnnMismatch
from .onednn import onednn_mode
from .ref import LOCAL_DIR_PREFIX, ClipRef
from ..decode.preprocess import preprocess_spec_from_open_clip
from .store import (
    DamagedWeightsError,
    WeightsNotFoundError,
    check_online,
    files_version,
    identity_roots,
    is_read_error,
    is_offline,
    prepare_hint,
    search_roots,
    save_unless_same,
    weights_load_error,
)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def load_clip(ref: ClipRef, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """Load a CLIP image encoder, once per worker and (ref, device, precision).

    Weights come from ``ref.model_dir``, else the cache, else are downloaded into the
    cache (unless offline). Only the image tower is kept.

    Parameters
    ----------
    ref : ClipRef
        Which model and where to look for it.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    precision : {"fp32", "bf16", "fp16"}
        See ``LoadedModel``.

    Raises
    ------
    WeightsNotFoundError
        Weights are missing and cannot be downloaded.
    UnsafeWeightsError
        A checkpoint file holds pickled objects other than tensors.
    DamagedWeightsError
        A weights or config file is empty, truncated or not what it should be (a
        ``WeightsNotFoundError``; the message names the file).
    """
    key = ("clip", ref, weights_version(ref), str(device), precision)
    return get_cached(key, lambda: _load(ref, device, precision))


def weights_version(ref: ClipRef) -> str:
    """The version (:func:`~dask_imgcurator.models.store.files_version`) of ``ref``'s local weights
    and config, empty where there are none to tell apart: those of a pretrained tag or an ``hf-hub:``
    model count only in ``model_dir`` (see :func:`~dask_imgcurator.models.store.identity_roots`)."""
    if ref.kind == "file":
        return files_version([Path(str(ref.pretrained)).expanduser()])
    if ref.kind in ("tag", "hf-hub"):
        candidates = [root / "clip" / ref.slug for root in identity_roots(ref.model_dir, ref.cache_dir, downloadable=True)]
    else:
        candidates = _candidates(ref)
    path = next((path for path in candidates if is_clip_dir(path)), None)
    return files_version([path / CONFIG_FILE, path / WEIGHTS_FILE]) if path is not None else ""


def _check_checkpoint(ref: ClipRef) -> None:
    if ref.kind == "file":
        check_known(ref)
        if not Path(str(ref.pretrained)).is_file():
            raise WeightsNotFoundError(f"checkpoint file {ref.pretrained} for {ref.name} does not exist")


def check_known(ref: ClipRef) -> None:
    """Raise ValueError when open_clip cannot build ``ref``: an unknown architecture or pretrained tag.

    For kinds ``tag`` (call it only when no local copy exists: a model dir may hold tags that
    open_clip does not know, such as ``random``) and ``file``; a no-op for the others. The
    one-line message lists the architecture's tags, or near architecture names.
    """
    if ref.kind not in ("tag", "file"):
        return
    if open_clip.get_model_config(ref.name) is None:
        names = {name.lower(): name for name in open_clip.list_models()}
        near = [names[n] for n in difflib.get_close_matches(ref.name.lower(), names, n=4)]
        problem = f"unknown open_clip architecture {ref.name!r} " + (
            f"(near: {', '.join(near)})" if near else "(see open_clip.list_models())"
        )
    elif ref.kind == "tag" and not open_clip.get_pretrained_cfg(ref.name, str(ref.pretrained)):
        tags = open_clip.list_pretrained_tags_by_model(ref.name)
        problem = (
            f"open_clip has no pretrained tag {ref.pretrained!r} for {ref.name} "
            f"(its tags: {', '.join(tags) or 'none'})"
        )
    else:
        return
    if ref.kind == "tag":
        where = " or ".join(str(path) for path in _candidates(ref))
        raise ValueError(f"{ref}: {problem}, and there is no local copy at {where}")
    relative = not os.path.isabs(os.path.expanduser(str(ref.pretrained)))
    raise ValueError(f"{ref}: {problem}" + (f", and {str(ref)!r} is not an existing path" if relative else ""))


def _load(ref: ClipRef, device: str | torch.device, precision: str) -> LoadedModel:
    visual, info = _load_visual(ref)
    mode = onednn_mode(config.get("models.onednn"))
    if mode == "off":
        return LoadedModel(visual, info, device=device, precision=precision)
    try:
        return LoadedModel(visual, info, device=device, precision=precision, onednn=True if mode == "on" else "measure")
    except OneDnnMismatch as exc:  # a tower our rewrite does not suit: PyTorch's own kernels
        warnings.warn(f"{exc}; using PyTorch's default CPU kernels", RuntimeWarning, stacklevel=2)
        visual, info = _load_visual(ref)
        return LoadedModel(visual, info, device=device, precision=precision)


def _load_visual(ref: ClipRef) -> tuple[torch.nn.Module, ModelInfo]:
    """The image tower of ``ref`` on the CPU, and what it needs and gives."""
    _check_checkpoint(ref)
    if ref.kind == "file":
        try:
            model = open_clip.create_model(ref.name, pretrained=ref.pretrained, weights_only=True)
        except Exception as err:
            if is_read_error(err):
                raise weights_load_error(Path(str(ref.pretrained)).expanduser(), err) from None
            if _is_mismatch(err):
                raise checkpoint_mismatch_error(ref, err) from None
            raise
        cfg = model_cfg(ref)
    else:
        path = clip_dir(ref)
        cfg = _read_config(path)["model_cfg"]  # names the file when it is damaged
        try:
            model = open_clip.create_model(LOCAL_DIR_PREFIX + str(path), require_pretrained=True)
        except Exception as err:
            if is_read_error(err):
                raise weights_load_error(path / WEIGHTS_FILE, err) from None
            if _is_mismatch(err):
                problems = ", ".join(_mismatch_problems(err)) or "other weights"
                raise DamagedWeightsError.of(path / WEIGHTS_FILE, f"its tensors do not fit {CONFIG_FILE} beside it ({problems})") from None
            raise
    info = ModelInfo(str(ref), int(cfg["embed_dim"]), preprocess_spec_from_open_clip(model.visual.preprocess_cfg))
    return model.visual, info


def _is_mismatch(err: Exception) -> bool:
    """A checkpoint of another architecture: torch's strict load, or open_clip's checks before it
    (``AssertionError: text pos_embed width changed!``, a key its conversion expects)."""
    return isinstance(err, (AssertionError, KeyError)) or (
        isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err)
    )


def checkpoint_mismatch_error(ref: ClipRef, err: Exception) -> ValueError:
    """torch's list of every missing, unexpected and misshapen key, as one line that says what to do."""
    return _mismatch(ref, _mismatch_problems(err))


def _mismatch_problems(err: Exception) -> list[str]:
    """Counts of torch's missing, unexpected and misshapen keys (its message lists every one)."""
    text = str(err)
    problems = [] if isinstance(err, RuntimeError) else [f"{type(err).__name__}: {text}"]
    if mismatched := text.count("size mismatch for"):
        problems.append(f"{mismatched} tensors of other shapes")
    for label in ("Missing", "Unexpected"):
        if found := re.search(rf"{label} key\(s\) in state_dict: (.*)", text):
            problems.append(f"{len(found.group(1).split(', '))} {label.lower()} keys")
    return problems


def _mismatch(ref: ClipRef, problems: list[str]) -> ValueError:
    return ValueError(
        f"checkpoint {ref.pretrained} does not fit the {ref.name} architecture ({', '.join(problems) or 'other weights'}); "
        f"give the architecture it was trained with before the path, as ARCH/PATH (a bare path means {ClipRef.name}), "
        f"e.g. --model ViT-B-32/{ref.pretrained}"
    )


def check_checkpoint_fits(ref: ClipRef) -> None:
    """Raise the error :func:`load_clip` would, from tensor shapes alone: a checkpoint file's image tower
    against its architecture's, built on the meta device (no memory, no weights read).

    So that a checkpoint of another architecture is refused before a cluster starts (SLURM jobs
    may wait in the queue first). A file that cannot be read is left to the load, which names it.
    """
    if ref.kind != "file":
        return
    found = _checkpoint_shapes(Path(str(ref.pretrained)).expanduser())
    if found is None:
        return
    with _no_root_log_setup(), torch.device("meta"):  # open_clip warns that no weights were loaded
        expected = open_clip.create_model(ref.name, device="meta").state_dict()
    # the positional embedding may differ: open_clip resizes it to the model's grid when loading
    visual = {k: tuple(v.shape) for k, v in expected.items() if k.startswith("visual.") and k != "visual.positional_embedding"}
    missing = [k for k in visual if k not in found]
    reshaped = [k for k in visual if k in found and found[k] != visual[k]]
    problems = [f"{len(reshaped)} tensors of other shapes"] if reshaped else []
    problems += [f"{len(missing)} missing keys"] if missing else []
    if problems:
        raise _mismatch(ref, problems)


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Name and shape of each tensor in a checkpoint, read without its data (None where unreadable)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        try:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="meta", weights_only=True)
    except Exception:  # noqa: BLE001  damaged or refused: the load reports it, naming the file
        return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    return {k.removeprefix("module."): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def clip_dir(ref: ClipRef) -> Path:
    """Local open_clip directory (config + safetensors) holding ``ref``'s weights.

    ``local-dir:`` refs point at it directly. Otherwise looks in ``ref.model_dir/clip/<slug>``,
    then the cache, and downloads with open_clip and saves into the cache when neither has
    it (unless offline).
    """
    if ref.kind == "file":
        raise ValueError(f"{ref} is a checkpoint file, not an open_clip directory")
    found = _local_dir(ref)
    if found is not None:
        return found
    what = f"CLIP model {ref}"
    if ref.kind == "local-dir":
        path = Path(ref.name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        raise WeightsNotFoundError.missing(
            what, [path], f"A model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}.", hint=""
        )
    check_known(ref)
    candidates = _candidates(ref)
    check_online(what, candidates, ref.offline, prepare_hint(str(ref)))
    try:
        _download(ref, candidates[-1])
    except Exception as err:  # network, hub or open_clip failure: one clear error
        raise WeightsNotFoundError.missing(
            what, candidates, f"Download failed: {type(err).__name__}: {err}", prepare_hint(str(ref))
        ) from err
    return candidates[-1]


def _candidates(ref: ClipRef) -> list[Path]:
    if ref.kind == "local-dir":
        return [Path(ref.name[len(LOCAL_DIR_PREFIX) :]).expanduser()]
    return [root / "clip" / ref.slug for root in search_roots(ref.model_dir, ref.cache_dir)]


def _local_dir(ref: ClipRef) -> Path | None:
    return next((path for path in _candidates(ref) if is_clip_dir(path)), None)


def _read_config(path: Path) -> dict[str, Any]:
    """The open_clip config of the model folder ``path``; ``DamagedWeightsError`` naming it if unreadable."""
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedWeightsError.of(file, f"it is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise DamagedWeightsError.of(file, "it has no model_cfg object")
    return config


def is_clip_dir(path: Path) -> bool:
    """Whether ``path`` holds an open_clip config and safetensors weights."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def open_clip_kwargs(ref: ClipRef) -> dict[str, Any]:
    """Arguments for ``open_clip.create_model`` that download ``ref`` (kind ``tag`` or ``hf-hub``).

    OpenAI-trained tags need QuickGELU, which open_clip only warns about; it is forced here.
    """
    if ref.kind == "hf-hub":
        return {"model_name": ref.name}
    quick_gelu = bool(open_clip.get_pretrained_cfg(ref.name, str(ref.pretrained)).get("quick_gelu"))
    return {"model_name": ref.name, "pretrained": ref.pretrained, "force_quick_gelu": quick_gelu}


def model_cfg(ref: ClipRef, cache_dir: str | None = None) -> dict[str, Any]:
    """open_clip ``model_cfg`` that ``ref`` is downloaded with (QuickGELU resolved)."""
    if ref.kind == "hf-hub":
        return _hf_config(ref, cache_dir)["model_cfg"]
    cfg = open_clip.get_model_config(ref.name)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {ref.name!r}; see open_clip.list_models()")
    if open_clip_kwargs(ref).get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    return cfg


def _hf_config(ref: ClipRef, cache_dir: str | None = None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    return json.loads(
        Path(hf_hub_download(ref.name[len("hf-hub:") :], CONFIG_FILE, cache_dir=cache_dir)).read_text()
    )


def _download(ref: ClipRef, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cfg = model_cfg(ref, cache_dir=tmp)
        with _no_root_log_setup():
            model = open_clip.create_model(**open_clip_kwargs(ref), cache_dir=tmp, require_pretrained=True)
        staged = Path(tmp) / "model"
        save_clip_dir(model, cfg, staged)
        try:
            os.replace(staged, dest)
        except OSError:
            if not is_clip_dir(dest):  # another worker finishing first is fine
                raise


@contextlib.contextmanager
def _no_root_log_setup():
    """Keep open_clip's ``logging.error`` on a failed download from configuring the root logger.

    Where no handler is set up, that call adds one and prints "ERROR:root:Failed to download ...",
    the same text as the exception raised right after it, which is what reaches the user.
    """
    root = logging.getLogger()
    if root.handlers:
        yield
        return
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeHandler(placeholder)


def save_clip_dir(model: torch.nn.Module, cfg: dict[str, Any], path: Path) -> None:
    """Write ``model`` as an open_clip ``local-dir:`` folder (config JSON + safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg, "preprocess_cfg": model.visual.preprocess_cfg}
    save_unless_same(path / CONFIG_FILE, json.dumps(config, indent=2).encode())
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_unless_same(path / WEIGHTS_FILE, save(tensors))


def clip_info(ref: ClipRef) -> ModelInfo:
    """Embedding width and preprocessing of ``ref`` without loading (or downloading) weights.

    Reads the local dir's config when there is one, else open_clip's built-in configs
    (``hf-hub:`` models fetch only their config file, unless offline).
    """
    _check_checkpoint(ref)
    path = _local_dir(ref) if ref.kind != "file" else None
    if path is None and (ref.kind == "local-dir" or (ref.kind == "hf-hub" and is_offline(ref.offline))):
        clip_dir(ref)  # raises the not-found error
    if path is not None or ref.kind == "hf-hub":
        config = _read_config(path) if path is not None else _hf_config(ref)
        cfg, pp = config["model_cfg"], config.get("preprocess_cfg", {})
    else:
        check_known(ref)
        cfg = model_cfg(ref)
        pp = open_clip.get_pretrained_cfg(ref.name, str(ref.pretrained)) if ref.kind == "tag" else {}
    merged = merge_preprocess_dict(PreprocessCfg(), pp)
    merged["size"] = cfg["vision_cfg"].get("image_size", merged["size"])
    return ModelInfo(str(ref), int(cfg["embed_dim"]), preprocess_spec_from_open_clip(merged))
