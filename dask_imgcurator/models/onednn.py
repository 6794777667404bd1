"""Faster CPU inference: linear layers and multi-head attention on oneDNN with prepacked weights.

PyTorch runs ``nn.Linear`` on the CPU through MKL's GEMM with the weight in its plain layout.
oneDNN (bundled with PyTorch) is faster on the same matrices once the weight has been reordered
into its blocked layout ahead of time, which is what :func:`use_onednn` does, once, at model load:
every ``nn.Linear`` becomes a :class:`PackedLinear` (an exact ``nn.GELU`` right after it in an
``nn.Sequential`` is fused into the same kernel) and every ``nn.MultiheadAttention`` a
:class:`PackedAttention` (packed input/output projections, ``scaled_dot_product_attention`` in between).
Results equal the original modules' up to float rounding (the tests compare them).

Measured on 2-core AMD EPYCs, fp32: on an AVX-512 one (Zen 5) GEMMs of CLIP ViT-B-32's shapes ran
at 190 GFLOP/s through MKL and 210 through packed oneDNN, and the whole encoder x1.21-1.25; on an
AVX2-only one the packed encoder ran at x0.84. Hence the ``auto`` setting (:func:`onednn_wanted`);
``benchmarks/README.md`` has the end-to-end figures.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PackedAttention", "PackedLinear", "onednn_available", "onednn_dtypes", "onednn_wanted", "use_onednn",
]

#: CPU capabilities (``torch.backends.cpu.get_cpu_capability()``) where the packed layers beat
#: PyTorch's defaults. Measured, ViT-B-32 fp32 encoder on 2 cores: x1.21-1.25 on AVX-512 (Zen 5),
#: x0.84 on AVX2 (an older EPYC); MKL's GEMM stays ahead where oneDNN has no AVX-512 kernels.
FASTER_ON = ("AVX512",)


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN kernels :func:`use_onednn` needs."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def onednn_wanted(setting: bool | str = "auto") -> bool:
    """Whether CPU models should get the packed layers, for the ``imgcurator.models.onednn`` setting.

    Parameters
    ----------
    setting : {"auto", True, False}
        ``"auto"``: where this PyTorch has the kernels and the CPU is one they were measured faster
        on (:data:`FASTER_ON`); True: wherever PyTorch has the kernels; False: never.
    """
    if isinstance(setting, str) and setting.lower() == "auto":
        return onednn_available() and torch.backends.cpu.get_cpu_capability() in FASTER_ON
    if isinstance(setting, bool):
        return setting and onednn_available()
    raise ValueError(f"imgcurator.models.onednn must be auto, true or false, not {setting!r}")


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


def _replace_children(parent: nn.Module) -> int:
    replaced = 0
    children = list(parent.named_children())
    for i, (name, child) in enumerate(children):
        if isinstance(child, nn.MultiheadAttention):  # it reads its projections' weights itself: all or nothing
            if supports_attention(child) and _packable(child.in_proj_weight):
                setattr(parent, name, PackedAttention(child))
                replaced += 1
        elif isinstance(child, nn.Linear) and _packable(child.weight):
            after = children[i + 1][1] if i + 1 < len(children) else None
            fuse = isinstance(parent, nn.Sequential) and isinstance(after, nn.GELU) and after.approximate == "none"
            setattr(parent, name, PackedLinear.from_linear(child, "gelu" if fuse else "none"))
            if fuse:
                setattr(parent, children[i + 1][0], nn.Identity())
            replaced += 1
        else:
            replaced += _replace_children(child)
    return replaced


def _packable(weight: torch.Tensor | None) -> bool:
    return weight is not None and weight.device.type == "cpu" and weight.dtype in onednn_dtypes()
