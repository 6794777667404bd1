"""Faster CPU inference: linear layers and multi-head attention on oneDNN with prepacked weights.

PyTorch runs ``nn.Linear`` on the CPU through MKL's GEMM with the weight in its plain layout.
oneDNN (bundled with PyTorch) is faster on the same matrices once the weight has been reordered
into its blocked layout ahead of time, which is what :func:`use_onednn` does, once, at model load:
every ``nn.Linear`` becomes a :class:`PackedLinear` (an exact ``nn.GELU`` right after it in an
``nn.Sequential`` is fused into the same kernel) and every ``nn.MultiheadAttention`` a
:class:`PackedAttention` (packed input/output projections, ``scaled_dot_product_attention`` in between).
Results equal the original modules' up to float rounding (the tests compare them).

Which is faster depends on the machine, not only on its instruction set. Measured on 2-core AMD
EPYCs, ViT-B-32 fp32: on an AVX-512 one (Zen 5) the packed encoder ran x1.21-1.25; on AVX2-only
ones x0.84 on one host and x1.0-1.19 on others of the same CPU model. Hence the ``auto`` setting
(:func:`onednn_mode`): at load, :func:`time_packing` times the model's forward pass both ways,
and the faster is kept. ``benchmarks/README.md`` has the end-to-end figures.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KernelTiming", "PackedAttention", "PackedLinear", "onednn_available", "onednn_dtypes", "onednn_mode",
    "remembered_timing", "time_packing", "use_onednn",
]

log = logging.getLogger(__name__)


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN kernels :func:`use_onednn` needs."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def onednn_mode(setting: bool | str = "auto") -> str:
    """What CPU models do about packed layers, for the ``imgcurator.models.onednn`` setting.

    Parameters
    ----------
    setting : {"auto", True, False}
        ``"auto"``: time both kinds of layers at load and keep the faster (:func:`time_packing`);
        True: pack; False: never pack.

    Returns
    -------
    {"measure", "on", "off"}
        "off" as well wherever this PyTorch lacks the kernels.
    """
    if isinstance(setting, str) and setting.lower() == "auto":
        wanted = "measure"
    elif isinstance(setting, bool):
        wanted = "on" if setting else "off"
    else:
        raise ValueError(f"imgcurator.models.onednn must be auto, true or false, not {setting!r}")
    return wanted if onednn_available() else "off"


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes whose linear layers :func:`use_onednn` packs on this CPU.

    float32 always; bfloat16 only where oneDNN has bf16 kernels for the CPU (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT on x86), elsewhere bf16 layers keep PyTorch's own kernels.
    """
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


class PackedLinear(nn.Module):
    """``y = act(x @ W.T + b)`` with ``W`` prepacked for oneDNN; inference only.

    Parameters
    ----------
    weight : torch.Tensor
        (out_features, in_features) on the CPU, float32 or bfloat16.
    bias : torch.Tensor, optional
        (out_features,), same dtype.
    activation : {"none", "gelu"}
        Fused after the matrix product (exact, erf-based GELU).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none") -> None:
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', not {activation!r}")
        self.out_features, self.in_features = weight.shape
        self.activation = activation
        self.dtype = weight.dtype
        # plain attributes, not parameters: oneDNN tensors cannot be moved, cast or saved
        self.packed_weight = _pack(weight)
        self.bias = None if bias is None else bias.detach().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "none") -> "PackedLinear":
        """Pack an ``nn.Linear`` (its weights are copied; the original can be dropped)."""
        return cls(linear.weight, linear.bias, activation)

    def __getstate__(self) -> dict:
        # oneDNN tensors have no storage to pickle: ship the weight in its plain layout, repack on arrival
        state = self.__dict__.copy()
        state["packed_weight"] = self.packed_weight.to_dense()
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state, packed_weight=_pack(state["packed_weight"]))
        super().__setstate__(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        algorithm = "none" if self.activation == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, self.activation, [], algorithm)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class PackedAttention(nn.Module):
    """Drop-in replacement for an ``nn.MultiheadAttention`` at inference, projections on oneDNN.

    Takes the same arguments and returns the same ``(output, weights)`` pair; attention runs
    through ``scaled_dot_product_attention`` unless attention weights are asked for.
    """

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        if not supports_attention(attn):
            raise ValueError(
                "only attention with equal q/k/v widths, no bias_k/bias_v and no add_zero_attn can be packed"
            )
        self.embed_dim = attn.embed_dim
        self.num_heads = attn.num_heads
        self.head_dim = attn.embed_dim // attn.num_heads
        self.batch_first = attn.batch_first
        self.in_proj = PackedLinear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = PackedLinear(attn.out_proj.weight, attn.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shared_kv = key is value  # identity is lost in the reshapes below
        self_attention = query is key and shared_kv
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0 if self.batch_first else 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, length, e = query.shape
        q, k, v = self._project(query, key, value, self_attention, shared_kv)
        mask = self._mask(attn_mask, key_padding_mask, n, length, k.shape[2], q.dtype)

        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.softmax(dim=-1)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
            weights = None

        out = self.out_proj(out.transpose(1, 2).reshape(n, length, e))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _project(self, query, key, value, self_attention: bool, shared_kv: bool) -> tuple[torch.Tensor, ...]:
        """(N, H, L, D) query, key and value; one packed GEMM when it is self-attention."""
        e = self.embed_dim
        if self_attention:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # cross-attention (rare: attentional poolers): project each input, keep its third
            q = self.in_proj(query)[..., :e]
            kv = self.in_proj(key)
            k = kv[..., e : 2 * e]
            v = kv[..., 2 * e :] if shared_kv else self.in_proj(value)[..., 2 * e :]
        return tuple(self._heads(t) for t in (q, k, v))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(self, attn_mask, key_padding_mask, n: int, length: int, source: int, dtype) -> torch.Tensor | None:
        """One additive float mask broadcastable to (N, H, L, S), or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # (N * H, L, S)
                mask = mask.reshape(n, self.num_heads, length, source)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).reshape(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's masks as additive floats (a True in a bool mask means: do not attend)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def supports_attention(attn: nn.MultiheadAttention) -> bool:
    """Whether :class:`PackedAttention` can stand in for ``attn``."""
    return bool(
        attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
    )


def use_onednn(module: nn.Module) -> int:
    """Replace ``module``'s linear layers and attention by packed oneDNN ones, in place.

    Only CPU float32/bfloat16 layers are replaced; anything else is left alone. Call it after
    the module is on its device and in its dtype, and only for inference (no gradients flow
    through packed weights).

    Parameters
    ----------
    module : torch.nn.Module
        Model to rewrite.

    Returns
    -------
    int
        How many layers were replaced (0 where oneDNN is not available).
    """
    if not onednn_available():
        return 0
    return _replace_children(module)


@dataclass(frozen=True)
class _Replacement:
    """One layer :func:`use_onednn` replaces: ``parent.name``, and the GELU fused into it, if any."""

    parent: nn.Module
    name: str
    gelu_name: str | None = None

    @property
    def layer(self) -> nn.Module:
        return getattr(self.parent, self.name)

    def packed(self) -> nn.Module:
        layer = self.layer
        if isinstance(layer, nn.MultiheadAttention):
            return PackedAttention(layer)
        return PackedLinear.from_linear(layer, "gelu" if self.gelu_name else "none")


def _replacements(parent: nn.Module) -> list[_Replacement]:
    found = []
    children = list(parent.named_children())
    for i, (name, child) in enumerate(children):
        if isinstance(child, nn.MultiheadAttention):  # it reads its projections' weights itself: all or nothing
            if supports_attention(child) and _packable(child.in_proj_weight):
                found.append(_Replacement(parent, name))
        elif isinstance(child, nn.Linear) and _packable(child.weight):
            after = children[i + 1][1] if i + 1 < len(children) else None
            fuse = isinstance(parent, nn.Sequential) and isinstance(after, nn.GELU) and after.approximate == "none"
            found.append(_Replacement(parent, name, children[i + 1][0] if fuse else None))
        else:
            found.extend(_replacements(child))
    return found


def _replace_children(parent: nn.Module) -> int:
    found = _replacements(parent)
    for r in found:
        packed = r.packed()
        setattr(r.parent, r.name, packed)
        if r.gelu_name:
            setattr(r.parent, r.gelu_name, nn.Identity())
    return len(found)


@dataclass(frozen=True)
class KernelTiming:
    """What :func:`time_packing` measured: the forward pass's time per input, both ways."""

    plain_ms: float
    packed_ms: float
    layers: int

    @property
    def packed_faster(self) -> bool:
        """Whether the packed layers were the faster."""
        return self.layers > 0 and self.packed_ms < self.plain_ms


def time_packing(
    module: nn.Module, sample: torch.Tensor, *, batch: int = 2, repeats: int = 2, rounds: int = 3,
    close: float = 0.05,
) -> KernelTiming:
    """Time ``module``'s forward pass with the layers :func:`use_onednn` would replace, as they are
    and packed, on this machine.

    The pass runs on ``batch`` copies of ``sample`` (stacked along its first dimension), the plain
    and the packed layers taking turns ``repeats`` times after a warm-up pass of each, and the
    fastest run of each counts (the speed of a shared machine moves between runs; turns and minima
    keep both sides comparable). Where the two come within ``close`` of each other, another round of ``repeats``
    turns follows, up to ``rounds`` rounds. The whole pass is timed, not the layers alone: on a
    2-core EPYC the layers timed one by one came out 1.3% faster plain on one thread while the
    encoder ran 14% faster packed. ``module`` is left as it was.

    Parameters
    ----------
    module : torch.nn.Module
        The model, on the CPU, in its dtype.
    sample : torch.Tensor
        One input the model takes (e.g. one preprocessed image, batch of 1).
    batch : int
        Copies of ``sample`` per timed pass (closer to real batches than one).
    repeats : int
        Timed passes of each form per round.
    rounds : int
        Most rounds.
    close : float
        Relative difference of the two below which another round is timed.

    Returns
    -------
    KernelTiming
        Milliseconds per input of the whole pass, both ways, and how many layers differ.
    """
    found = _replacements(module)
    if not found:
        return KernelTiming(plain_ms=0.0, packed_ms=0.0, layers=0)
    x = sample.repeat(batch, *([1] * (sample.dim() - 1)))
    swap = _Swap(found)

    def form(packed: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            swap.set(packed)
            return module(x)
        return run

    best = [math.inf, math.inf]
    try:
        for done in range(1, max(rounds, 1) + 1):
            runs = _fastest_runs([form(False), form(True)], repeats, warm_up=done == 1)
            best = list(map(min, best, runs))
            timing = KernelTiming(plain_ms=1000 * best[0] / batch, packed_ms=1000 * best[1] / batch, layers=len(found))
            if abs(timing.packed_ms - timing.plain_ms) >= close * timing.plain_ms:
                break
    finally:
        swap.set(False)
    log.debug("kernel timing took %d round(s): %s", done, timing)
    return timing


class _Swap:
    """Switch a module's replaceable layers between their own and packed forms, in place."""

    def __init__(self, found: list[_Replacement]) -> None:
        self._slots = [(r, r.layer, getattr(r.parent, r.gelu_name) if r.gelu_name else None, r.packed())
                       for r in found]

    def set(self, packed: bool) -> None:
        for r, plain, gelu, packed_layer in self._slots:
            setattr(r.parent, r.name, packed_layer if packed else plain)
            if r.gelu_name:
                setattr(r.parent, r.gelu_name, nn.Identity() if packed else gelu)


def remembered_timing(key: str, measure: Callable[[], KernelTiming], path: str | os.PathLike) -> KernelTiming:
    """The timing stored under ``key`` in the JSON file ``path``, else ``measure()``, stored there.

    Measuring once per machine and model keeps later runs on the kernels of the first, so that
    re-running a job (or resuming it) computes the same embeddings bit for bit. A file lock lets one
    process measure while the others of the machine wait for its result. Where the file cannot be
    written, the timing is measured each time.

    Parameters
    ----------
    key : str
        What the timing depends on (model, precision, threads, CPU, torch version).
    measure : callable
        Takes the timing (e.g. :func:`time_packing`) when none is stored.
    path : path-like
        The JSON file of remembered timings.

    Returns
    -------
    KernelTiming
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock", timeout=600):
            known = _read_timings(path)
            if key in known:
                return known[key]
            timing = measure()
            _write_timings(path, {**known, key: timing})
            return timing
    except (OSError, Timeout) as exc:
        log.info("kernel timings cannot be remembered in %s (%s): measuring in this process", path, exc)
        return measure()


def _read_timings(path: Path) -> dict[str, KernelTiming]:
    """The well-formed entries of ``path``; a damaged file or entry counts as never measured."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:  # damaged (not JSON, not UTF-8): measure afresh
        return {}
    if not isinstance(stored, dict):
        return {}
    known = {}
    for key, value in stored.items():
        timing = _timing_entry(value)
        if timing is None:
            log.info("ignoring the malformed or foreign kernel timing %r in %s: measuring it again", key, path)
        else:
            known[key] = timing
    return known


def _timing_entry(value: object) -> KernelTiming | None:
    """The ``KernelTiming`` stored as ``value``, or None where it is not exactly one of ours."""
    fields = [f.name for f in dataclasses.fields(KernelTiming)]
    if not isinstance(value, dict) or sorted(value) != sorted(fields):
        return None  # another layout (an older or newer method's entry)
    ms = [value["plain_ms"], value["packed_ms"]]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in ms):
        return None
    layers = value["layers"]
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        return None
    return KernelTiming(float(ms[0]), float(ms[1]), layers)


def _write_timings(path: Path, timings: dict[str, KernelTiming]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({key: dataclasses.asdict(t) for key, t in timings.items()}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fastest_runs(forms: list[Callable[[], torch.Tensor]], repeats: int, warm_up: bool = True) -> list[float]:
    """Seconds of the fastest of ``repeats`` runs of each form, the forms taking turns (after a warm-up run)."""
    best = [math.inf] * len(forms)
    with torch.inference_mode():
        for run in range(0 if warm_up else 1, repeats + 1):
            for i, form in enumerate(forms):
                start = time.perf_counter()
                form()
                if run:
                    best[i] = min(best[i], time.perf_counter() - start)
    return best


def _packable(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.device.type == "cpu" and weight.dtype in onednn_dtypes()
