"""A loaded image encoder: device, precision and output normalisation in one place."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..decode.base import PreprocessSpec
from .onednn import KernelTiming, onednn_dtypes, remembered_timing, time_packing, use_onednn
from .store import kernel_timings_file

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What a model needs and produces, known without loading its weights."""

    name: str
    embed_dim: int
    preprocess: PreprocessSpec


class OneDnnMismatch(RuntimeError):
    """A module rewritten for oneDNN does not reproduce its own output; load it again without."""


#: Part of the remembered timings' keys: choices the layer-by-layer timing of earlier versions made
#: are measured again (on one EPYC it had picked the slower kernels).
TIMING_METHOD = "whole pass"


class LoadedModel:
    """An image encoder ready for inference on one device.

    Parameters
    ----------
    forward : callable
        ``nn.Module`` or function mapping a pixel batch to (N, D) features.
    info : ModelInfo
        Name, embedding width and preprocessing of the model.
    device : str or torch.device
        Where it runs.
    precision : {"fp32", "bf16", "fp16"}
        fp32; bf16 (CPU: module weights cast to bf16; GPU: bf16 autocast); fp16 (GPU
        only, autocast).
    onednn : {False, True, "measure"}
        On the CPU, replace a module's linear layers and attention by oneDNN-packed ones
        (:mod:`~dask_imgcurator.models.onednn`): True always, "measure" where they ran faster than
        PyTorch's on this machine (:func:`~dask_imgcurator.models.onednn.time_packing`; what was
        measured is kept in :attr:`kernel_timing`). A one-image check refuses a rewrite that changes
        the output (:class:`OneDnnMismatch`).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        info: ModelInfo,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        onednn: bool | str = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        if precision == "fp16" and on_cpu:
            raise ValueError("precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
        self.info = info
        self.precision = precision
        is_module = isinstance(forward, torch.nn.Module)
        cast_weights = is_module and precision == "bf16" and on_cpu  # else autocast
        if precision == "bf16" and on_cpu and torch.bfloat16 not in onednn_dtypes():
            warnings.warn(
                f"{info.name}: precision 'bf16' on a CPU without bf16 kernels (they need AVX-512 BW/VL/DQ or "
                "AVX-NE-CONVERT) runs on PyTorch's slow fallback (ViT-B-32 on an AVX2 EPYC: 2 images/s "
                "against 17 in fp32); use precision 'fp32' here",
                RuntimeWarning, stacklevel=2,
            )
        self._input_dtype = torch.bfloat16 if cast_weights else torch.float32
        self._autocast_dtype = None if precision == "fp32" or cast_weights else _DTYPES[precision]
        if is_module:
            forward = forward.eval().requires_grad_(False).to(self.device, self._input_dtype)
        self._forward = forward
        # one batch at a time: concurrent tasks of a worker overlap their reading, decoding and writing
        # with each other's model runs, while the model itself keeps all of torch's threads
        self._lock = threading.Lock()
        self.kernel_timing: KernelTiming | None = None
        self.onednn_layers = self._use_onednn(measure=onednn == "measure") if onednn and on_cpu and is_module else 0

    def _use_onednn(self, measure: bool) -> int:
        size = self.preprocess.size
        probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        if measure:
            key = "|".join((self.info.name, self.precision, f"{torch.get_num_threads()} threads",
                            f"{cpu_model()} {cpu_isa()} x{os.cpu_count()}", f"torch {torch.__version__}",
                            TIMING_METHOD))
            self.kernel_timing = timing = remembered_timing(
                key, lambda: time_packing(self._forward, probe.to(self._input_dtype)), kernel_timings_file()
            )
            log.info(
                "%s: %d layers take %.1f ms per image packed for oneDNN, %.1f ms as they are: %s",
                self.info.name, timing.layers, timing.packed_ms, timing.plain_ms,
                "packing them" if timing.packed_faster else "leaving them",
            )
            if not timing.packed_faster:
                return 0
        before = self.encode(probe)
        try:
            replaced = use_onednn(self._forward)
        except RuntimeError as exc:  # a kernel this CPU lacks: the caller reloads the module unrewritten
            raise OneDnnMismatch(f"{self.info.name} cannot use oneDNN layers here: {exc}") from exc
        if replaced:
            try:
                after = self.encode(probe)
            except Exception as exc:  # noqa: BLE001 - any failure means: not usable for this module
                raise OneDnnMismatch(f"{self.info.name} fails with oneDNN layers: {exc}") from exc
            cosine = float((before * after).sum())
            if not cosine >= 0.999:
                raise OneDnnMismatch(
                    f"{self.info.name} with oneDNN layers gives another embedding (cosine {cosine:.4f})"
                )
            log.debug("%s: %d layers on oneDNN", self.info.name, replaced)
        return replaced

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_lock"]  # locks do not pickle; each copy guards its own model
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def embed_dim(self) -> int:
        """Width D of the embeddings."""
        return self.info.embed_dim

    @property
    def preprocess(self) -> PreprocessSpec:
        """How pixels must be prepared for ``encode``."""
        return self.info.preprocess

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a batch of preprocessed images.

        Parameters
        ----------
        pixels : torch.Tensor
            (N, 3, S, S) float32, normalised as ``preprocess`` describes.

        Returns
        -------
        torch.Tensor
            (N, D) float32 on the model's device, each row L2-normalised.
        """
        size = self.preprocess.size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(
                f"{self.info.name} expects pixels of shape (N, 3, {size}, {size}), got {tuple(pixels.shape)}"
            )
        if len(pixels) == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        x = pixels.to(self.device, self._input_dtype, non_blocking=True)
        with self._lock, torch.inference_mode(), self._autocast():
            out = self._forward(x)
            if isinstance(out, tuple):  # towers that also return tokens
                out = out[0]
            if tuple(out.shape) != (len(pixels), self.embed_dim):
                raise ValueError(
                    f"{self.info.name} returned shape {tuple(out.shape)}, expected ({len(pixels)}, {self.embed_dim})"
                )
            return F.normalize(out.float(), dim=-1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)


#: CPU flags that open other oneDNN kernels for the package's precisions (bf16 and fp16, AVX-512 and
#: AMX paths) beside torch's vector capability.
_KERNEL_FLAGS = ("avx512_bf16", "avx512_fp16", "avx_ne_convert", "amx_bf16", "amx_fp16")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (what kernel speed depends on), as Linux reports it."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


@functools.cache
def cpu_isa() -> str:
    """The instruction set the CPU kernels run on here: torch's vector capability and the flags of
    :data:`_KERNEL_FLAGS` the CPU has (e.g. ``AVX512+avx512_bf16``).

    Virtual machines often name only the family ("AMD EPYC" for an AVX2 Milan and an AVX-512 Zen 5
    alike), so the model name alone does not tell machines apart whose fastest kernels differ.
    """
    flags = cpu_flags()
    return "+".join([torch.backends.cpu.get_cpu_capability(), *(f for f in _KERNEL_FLAGS if f in flags)])


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``avx2``, ``avx512_bf16``, ...); empty elsewhere."""
    return frozenset(_cpuinfo_field("flags").split())


def _cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in ``/proc/cpuinfo``, "" where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    return ""
