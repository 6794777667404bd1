"""Where model weights live: model dirs, the download cache, downloads, and safe loading.

A model dir (and the cache, which has the same layout) looks like::

    MODEL_DIR/
      clip/<slug>/open_clip_config.json        # open_clip "local-dir:" format
      clip/<slug>/open_clip_model.safetensors
      heads/<head>/<slug>.safetensors | .pth   # head for the CLIP model <slug>

``<slug>`` names the CLIP model, e.g. ``ViT-L-14-openai`` (see ``ClipRef.slug``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tempfile
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError as _SafetensorError

WEIGHT_SUFFIXES = (".safetensors", ".pth")
_TRUE = ("1", "true", "yes", "on")
_PREPARE_HINT = (
    "To prepare weights for a machine without internet, run `imgcurator models download "
    "--model-dir DIR --model {model}` on a machine with internet, copy DIR over, and pass `--model-dir DIR` "
    "(model_dir=DIR in Python)."
)


def prepare_hint(model: str = "NAME/TAG") -> str:
    """How to get the weights of ``model`` onto a machine without internet."""
    return _PREPARE_HINT.format(model=model)


class WeightsNotFoundError(FileNotFoundError):
    """Weights are not available locally and could not (or may not) be downloaded."""

    @classmethod
    def missing(cls, what: str, looked: list[Path], reason: str, hint: str | None = None) -> WeightsNotFoundError:
        """The error for ``what``, listing where it was looked for, why, and how to prepare it (``hint``,
        default :func:`prepare_hint` for any model; "" where downloading cannot help)."""
        places = "\n".join(f"  {p}" for p in looked) or "  (nowhere)"
        hint = prepare_hint() if hint is None else hint
        return cls(f"{what} not found. Looked in:\n{places}\n{reason}" + (f"\n{hint}" if hint else ""))


class DamagedWeightsError(WeightsNotFoundError):
    """A weights (or config) file is there but unreadable: empty, truncated or not weights at all.

    A ``WeightsNotFoundError``: no usable copy was found, and the cure is the same, a fresh
    download or a good copy in place of the file.
    """

    @classmethod
    def of(cls, path: str | os.PathLike, reason: str) -> DamagedWeightsError:
        """The error for the damaged file ``path``, saying why it cannot be read and what to do."""
        return cls(
            f"{path} is damaged (truncated or incomplete download?) and cannot be read: {reason}. "
            "Delete it and download it again (`imgcurator models download`), or replace it with a good copy."
        )


class WeightsVerificationError(RuntimeError):
    """A downloaded file does not have the expected size or SHA-256."""


class UnsafeWeightsError(ValueError):
    """A weights file holds pickled Python objects other than tensors; it is never executed."""


@dataclass(frozen=True)
class Source:
    """One place a weights file can be downloaded from.

    Exactly one of ``url`` (http(s) or file URL) and ``hf_repo`` (with ``hf_filename``)
    is set. ``member`` names the file inside a zip archive; ``size``/``sha256`` describe
    the downloaded object and are verified when known (None: not verified).
    """

    url: str | None = None
    hf_repo: str | None = None
    hf_filename: str | None = None
    hf_revision: str | None = None
    member: str | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def suffix(self) -> str:
        """Suffix of the stored weights file (``.pth`` or ``.safetensors``)."""
        name = self.member or self.hf_filename or str(self.url)
        return ".safetensors" if name.endswith(".safetensors") else ".pth"

    def __str__(self) -> str:
        if self.hf_repo:
            return f"hf-hub:{self.hf_repo}/{self.hf_filename}@{self.hf_revision or 'main'}"
        return f"{self.url}" + (f" ({self.member})" if self.member else "")


@dataclass(frozen=True)
class WeightFile:
    """A weights file known by a stem inside a model dir, with its download sources.

    Parameters
    ----------
    name : str
        Human-readable name used in messages (``"aesthetic head for ViT-L-14-openai"``).
    stem : str
        Path inside a model dir without suffix (``"heads/aesthetic/ViT-L-14-openai"``).
    sources : tuple of Source
        Tried in order; empty when the file can only be provided locally.
    embed_dim : int or None
        Embedding width the weights expect, when known.
    """

    name: str
    stem: str
    sources: tuple[Source, ...] = ()
    embed_dim: int | None = None


_L14 = "ViT-L-14-openai"
#: Head weights that can be downloaded, by (head name, CLIP slug).
KNOWN_HEAD_WEIGHTS: dict[tuple[str, str], WeightFile] = {
    ("aesthetic", _L14): WeightFile(
        name=f"LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) for {_L14}",
        stem=f"heads/aesthetic/{_L14}",
        sources=(
            Source(
                hf_repo="ttj/sac-logos-ava1-l14-linearMSE",
                hf_filename="model.safetensors",
                hf_revision="1e77fa05081323d99725fc40a9bf9f88180490e7",
            ),
            Source(
                url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                "sac+logos+ava1-l14-linearMSE.pth",
                size=3_714_759,
            ),
        ),
        embed_dim=768,
    ),
    ("nsfw", _L14): WeightFile(
        name=f"LAION CLIP-based NSFW detector (clip_autokeras_binary_nsfw) for {_L14}",
        stem=f"heads/nsfw/{_L14}",
        sources=(
            Source(
                url="https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/"
                "clip_autokeras_binary_nsfw.zip",
                member="clip_autokeras_binary_nsfw.pth",
            ),
        ),
        embed_dim=768,
    ),
}


def imgcurator_home() -> Path:
    """Where the package keeps what it downloads or learns: ``$IMGCURATOR_HOME``, default ``~/.cache/dask_imgcurator``."""
    return Path(os.environ.get("IMGCURATOR_HOME") or "~/.cache/dask_imgcurator").expanduser()


def default_cache_dir() -> Path:
    """Download cache: ``$IMGCURATOR_HOME/models``, default ``~/.cache/dask_imgcurator/models``."""
    return imgcurator_home() / "models"


def kernel_timings_file() -> Path:
    """Kernel timings remembered per machine and model (see :func:`~dask_imgcurator.models.onednn.remembered_timing`)."""
    return imgcurator_home() / "kernel-timings.json"


def is_offline(offline: bool | None = None) -> bool:
    """True when downloads are disabled: ``offline``, else ``HF_HUB_OFFLINE``/``IMGCURATOR_OFFLINE``."""
    if offline is not None:
        return offline
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "IMGCURATOR_OFFLINE")
    )


def absolute_dirs(obj: object, *fields: str) -> None:
    """Make the path fields ``fields`` of the frozen dataclass ``obj`` absolute, ``~`` expanded.

    Paths as the client means them: a worker may run in another directory (a cluster started
    elsewhere, a job script that changes directory) and would miss relative ones.
    """
    for name in fields:
        value = getattr(obj, name)
        if value is not None:
            object.__setattr__(obj, name, os.path.abspath(os.path.expanduser(os.fspath(value))))


def search_roots(model_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Model dirs searched in order: the explicit ``model_dir``, then the cache."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return ([Path(model_dir).expanduser()] if model_dir else []) + [cache]


def identity_roots(model_dir: str | os.PathLike | None, cache_dir: str | os.PathLike | None,
                   downloadable: bool) -> list[Path]:
    """The roots of :func:`search_roots` whose weights files identify a run (:func:`files_version`).

    Not the cache for weights that a download puts there: those are what their tag or source names,
    and counting them would make a run that downloads them (absent when it starts, present when it is
    run again) another run than itself, never resumable. In ``model_dir``, the user's folder, weights
    saved over the old ones make another run.
    """
    roots = search_roots(model_dir, cache_dir)
    return roots[:-1] if downloadable else roots


#: Fields of the model configurations that say where weights are looked for and whether they may be
#: downloaded: left out of run fingerprints, which take the weights' :func:`files_version` instead.
WHERE_WEIGHTS_ARE = ("model_dir", "cache_dir", "offline")


def files_version(paths: list[Path]) -> str:
    """Name, size and modification time of each existing file of ``paths``: changes when one is replaced.

    Part of a run's fingerprint and of the worker cache's keys, so that weights saved over the old
    ones at the same path (a fine-tuned checkpoint) make another run, not the old results. Not the
    folder: weights moved or copied elsewhere with their times (``mv``, ``rsync -a``, ``cp -p``)
    are the same weights, and a run interrupted before the move resumes after it.
    """
    stats = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        stats.append(f"{Path(path).name}:{info.st_size}:{info.st_mtime_ns}")
    return " ".join(stats)


def find_weights(stem: str, roots: list[Path]) -> Path | None:
    """First existing ``root/stem + suffix`` (safetensors preferred), or None."""
    for root in roots:
        for suffix in WEIGHT_SUFFIXES:
            path = root / (stem + suffix)
            if path.is_file():
                return path
    return None


def resolve(
    entry: WeightFile,
    model_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path:
    """Path of a weights file: from ``model_dir``, else the cache, else downloaded into the cache.

    Downloads are verified against the source's size/SHA-256 when known and written
    atomically. Files found locally are trusted as they are.

    Raises
    ------
    WeightsNotFoundError
        Not found locally and offline, without a source, or every download failed.
    WeightsVerificationError
        A download has the wrong size or checksum (nothing is stored).
    """
    found = locate(entry, model_dir, cache_dir, offline)
    if found is not None:
        return found
    roots = search_roots(model_dir, cache_dir)
    looked = _looked(entry, roots)
    failures = []
    for source in entry.sources:
        dest = roots[-1] / (entry.stem + source.suffix)
        try:
            download(source, dest)
            return dest
        except WeightsVerificationError:
            raise
        except Exception as err:  # any failure of one source: try the next, report all
            failures.append(f"  {source}: {type(err).__name__}: {err}")
    raise WeightsNotFoundError.missing(entry.name, looked, "Download failed:\n" + "\n".join(failures))


def locate(
    entry: WeightFile,
    model_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
) -> Path | None:
    """Local path of a weights file, or None when ``resolve`` would download it; never downloads.

    Raises
    ------
    WeightsNotFoundError
        Not found locally and offline or without a source, as ``resolve`` raises it.
    """
    roots = search_roots(model_dir, cache_dir)
    found = find_weights(entry.stem, roots)
    if found is not None:
        return found
    looked = _looked(entry, roots)
    if not entry.sources:
        raise WeightsNotFoundError.missing(entry.name, looked, "No download source is known for it.", hint="")
    check_online(entry.name, looked, offline)
    return None


def _looked(entry: WeightFile, roots: list[Path]) -> list[Path]:
    return [root / (entry.stem + "{" + ",".join(WEIGHT_SUFFIXES) + "}") for root in roots]


def check_online(what: str, looked: list[Path], offline: bool | None, hint: str | None = None) -> None:
    """Raise ``WeightsNotFoundError`` for ``what`` when downloads are disabled."""
    if is_offline(offline):
        why = "offline=True" if offline else "HF_HUB_OFFLINE or IMGCURATOR_OFFLINE is set"
        raise WeightsNotFoundError.missing(what, looked, f"Downloads are disabled ({why}).", hint)


def _umask() -> int:
    """This process's umask, read without changing it where the OS tells (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def share_mode(path: str | os.PathLike) -> None:
    """Give the file ``path`` the mode a new file gets from the umask (``0o666 & ~umask``).

    safetensors (and temporary files) write 0600, which other users of a shared model dir
    cannot read; call this after saving a weights file.
    """
    os.chmod(path, 0o666 & ~_umask())


def save_unless_same(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (atomically, umask mode) unless the file already holds exactly it.

    Saving the same weights again leaves the file and its modification time alone: the time is
    part of what identifies a run (``files_version``), so a rewrite would make the next run another.
    """
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.write_bytes(data)
    share_mode(tmp)
    os.replace(tmp, path)


def download(source: Source, dest: Path) -> None:
    """Download ``source`` to ``dest`` atomically, verifying size/SHA-256 and unzipping ``member``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        fetched = _fetch(source, Path(tmp))
        verify(fetched, source.size, source.sha256, str(source))
        if source.member:
            with zipfile.ZipFile(fetched) as archive, archive.open(source.member) as src:
                fetched = Path(tmp) / "member"
                with open(fetched, "wb") as out:
                    shutil.copyfileobj(src, out)
        share_mode(fetched)
        os.replace(fetched, dest)


def _fetch(source: Source, tmp: Path) -> Path:
    if source.hf_repo:
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                source.hf_repo, str(source.hf_filename), revision=source.hf_revision, local_dir=tmp / "hf"
            )
        )
    target = tmp / "download"
    with urllib.request.urlopen(str(source.url), timeout=60) as response, open(target, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    return target


def verify(path: Path, size: int | None, sha256: str | None, what: str) -> None:
    """Raise ``WeightsVerificationError`` when ``path`` differs from a known size or SHA-256."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        raise WeightsVerificationError(f"{what}: expected {size} bytes, got {actual_size}")
    if sha256 is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256.lower():
            raise WeightsVerificationError(f"{what}: SHA-256 {digest.hexdigest()} does not match {sha256}")


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_reason(err: BaseException) -> str:
    """The line of a torch/safetensors load error that says what was wrong (not its boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    marked = [ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in lines if "WeightsUnpickler error:" in ln]
    plain = [ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE + ("(",))]
    line = next((ln for ln in marked + plain if ln), lines[0] if lines else "")
    return line.split(". ")[0].rstrip(".") or f"{type(err).__name__} (the file ends early)"


def weights_load_error(path: str | os.PathLike, err: BaseException) -> Exception:
    """The user-facing error for ``err``, raised while reading the weights file ``path``.

    ``UnsafeWeightsError`` for a pickle that ``torch.load(weights_only=True)`` refused,
    ``DamagedWeightsError`` for a file that is empty, truncated or no weights file at all
    (an HTML error page saved as ``.pth``), both naming the file and PyTorch's reason.
    """
    path = Path(path)
    reason = _torch_reason(err)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if not head:
        return DamagedWeightsError.of(path, "the file is empty")
    looks_like_torch = head.startswith((b"PK\x03\x04", b"\x80"))  # zip (torch.save) or pickle protocol 2+
    if isinstance(err, pickle.UnpicklingError) and (looks_like_torch or "global" in reason.lower()):
        return UnsafeWeightsError(
            f"refusing to load {path}: it is not a plain tensor state dict, and loading it could "
            "run arbitrary code. Only .safetensors files and torch.save(state_dict) files are "
            f"accepted. (torch.load(weights_only=True) said: {reason})"
        )
    if not looks_like_torch and path.suffix != ".safetensors":
        reason = f"it is not a PyTorch weights file ({reason})"
    return DamagedWeightsError.of(path, reason)


_UNREADABLE = (pickle.UnpicklingError, EOFError, _SafetensorError)
_NOT_THE_FILE = (  # RuntimeErrors of a readable file, or of the machine: the file is not damaged
    "Error(s) in loading state_dict",  # weights of another model
    "can't allocate memory",  # torch's CPU allocator
    "out of memory",
)


def is_read_error(err: BaseException) -> bool:
    """Whether ``err``, raised while loading a weights file, says the file itself cannot be read.

    torch reports a truncated or foreign file as a ``RuntimeError``, but also a state dict of
    another model and a machine out of memory; those are not damage, and calling them so would
    send a user to delete good weights.

    >>> is_read_error(RuntimeError("PytorchStreamReader failed reading zip archive"))
    True
    >>> is_read_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    False
    """
    if isinstance(err, _UNREADABLE):
        return True
    if not isinstance(err, RuntimeError) or isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return False
    text = str(err)
    return not any(marker in text for marker in _NOT_THE_FILE)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a tensor state dict from ``.safetensors`` or a ``torch.save`` file, never running pickled code.

    Raises
    ------
    UnsafeWeightsError
        The file holds Python objects other than tensors (``torch.load(weights_only=True)``
        refuses it; nothing in it is executed).
    DamagedWeightsError
        The file is empty, truncated or not a weights file; the message names it.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not is_read_error(err):
            raise
        raise weights_load_error(path, err) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(obj)
