"""oneDNN-packed layers give what the PyTorch modules they replace give."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import dask
import open_clip
import pytest
import torch
from torch import nn

from dask_imgcurator.models import load_clip, make_tiny_model_dir
from dask_imgcurator.models import encoder as encoder_module
from dask_imgcurator.models.encoder import LoadedModel, ModelInfo, OneDnnMismatch
from dask_imgcurator.models import onednn
from dask_imgcurator.models.onednn import (
    KernelTiming, PackedAttention, PackedLinear, onednn_available, onednn_dtypes, onednn_mode, remembered_timing,
    time_packing, use_onednn,
)

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
needs_bf16_kernels = pytest.mark.skipif(
    torch.bfloat16 not in onednn_dtypes(), reason="this CPU has no oneDNN bf16 kernels (needs AVX-512 BW/VL/DQ)"
)


@pytest.fixture
def onednn_on():
    """Packed layers whatever this CPU is (``auto`` leaves them off where they measured slower)."""
    with dask.config.set({"imgcurator.models.onednn": True}):
        yield


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 16), (3, 7, 16), (1, 16)])
def test_packed_linear_matches_linear(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 24, bias=bias)
    x = _randn(*shape)
    packed = PackedLinear.from_linear(linear)
    torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    fused = PackedLinear.from_linear(linear, "gelu")
    torch.testing.assert_close(fused(x), nn.functional.gelu(linear(x)), rtol=1e-5, atol=1e-5)


@needs_bf16_kernels
def test_packed_linear_bf16_close_to_float() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = _randn(8, 64, dtype=torch.bfloat16)
    out = PackedLinear.from_linear(linear)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), linear(x).float(), rtol=2e-2, atol=2e-2)


def test_packed_linear_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match="activation"):
        PackedLinear(torch.zeros(2, 2), activation="relu")


def _mha(batch_first: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(1)
    return nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()


def _pair(attn: nn.MultiheadAttention, *args, **kwargs):
    with torch.inference_mode():
        return attn(*args, **kwargs), PackedAttention(attn)(*args, **kwargs)


def _assert_same(expected, got) -> None:
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_packed_attention_self_attention(need_weights: bool, average: bool) -> None:
    x = _randn(3, 5, 16)
    _assert_same(*_pair(_mha(), x, x, x, need_weights=need_weights, average_attn_weights=average))


def test_packed_attention_sequence_first_and_unbatched() -> None:
    x = _randn(5, 3, 16)
    _assert_same(*_pair(_mha(batch_first=False), x, x, x, need_weights=False))
    single = _randn(5, 16)
    _assert_same(*_pair(_mha(), single, single, single))
    _assert_same(*_pair(_mha(batch_first=False), single, single, single, need_weights=False))


def test_packed_attention_cross_attention() -> None:
    q, kv, v = _randn(2, 3, 16, seed=1), _randn(2, 6, 16, seed=2), _randn(2, 6, 16, seed=3)
    _assert_same(*_pair(_mha(), q, kv, kv, need_weights=False))
    _assert_same(*_pair(_mha(), q, kv, v, need_weights=False))
    _assert_same(*_pair(_mha(), q, kv, v))


@pytest.mark.parametrize("need_weights", [False, True])
def test_packed_attention_masks(need_weights: bool) -> None:
    x = _randn(2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    additive = _randn(5, 5, seed=4)
    per_head = _randn(2 * 4, 5, 5, seed=5)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for kwargs in (
        {"attn_mask": causal},
        {"attn_mask": additive},
        {"attn_mask": per_head},
        {"key_padding_mask": padding},
        {"attn_mask": causal, "key_padding_mask": padding},
    ):
        _assert_same(*_pair(_mha(), x, x, x, need_weights=need_weights, **kwargs))


def test_packed_attention_is_causal_equals_causal_mask() -> None:
    x = _randn(2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    attn = _mha()
    with torch.inference_mode():
        expected = attn(x, x, x, attn_mask=causal, need_weights=False)[0]
        packed = PackedAttention(attn)
        for need_weights in (False, True):
            got = packed(x, x, x, is_causal=True, need_weights=need_weights)[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_attention_refuses_what_it_cannot_reproduce() -> None:
    with pytest.raises(ValueError, match="bias_k"):
        PackedAttention(nn.MultiheadAttention(16, 4, add_bias_kv=True))
    with pytest.raises(ValueError):
        PackedAttention(nn.MultiheadAttention(16, 4, kdim=8, vdim=8))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.tanh_mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU(approximate="tanh"))
        self.odd = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True)
        self.wide = nn.Linear(16, 16).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.odd(x, x, x, need_weights=False)[0]
        x = x + self.tanh_mlp(x)
        return self.mlp(x) + self.wide(x.double()).float()


def test_use_onednn_rewrites_in_place_and_keeps_results() -> None:
    torch.manual_seed(2)
    block = _Block().eval()
    original = copy.deepcopy(block)
    x = _randn(3, 5, 16)
    assert use_onednn(block) == 4  # attn, both mlp linears (first fused with GELU), tanh_mlp's linear
    assert isinstance(block.attn, PackedAttention)
    assert isinstance(block.mlp[0], PackedLinear) and block.mlp[0].activation == "gelu"
    assert isinstance(block.mlp[1], nn.Identity)
    assert block.tanh_mlp[0].activation == "none" and isinstance(block.tanh_mlp[1], nn.GELU)
    assert isinstance(block.odd, nn.MultiheadAttention)  # bias_k: left alone
    assert isinstance(block.wide, nn.Linear)  # float64: left alone
    with torch.inference_mode():
        torch.testing.assert_close(block(x), original(x), rtol=1e-5, atol=1e-5)


def test_open_clip_vit_unchanged_by_onednn() -> None:
    """A real open_clip ViT (small config): same embeddings through the rewritten tower."""
    torch.manual_seed(3)
    visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    original = copy.deepcopy(visual)
    replaced = use_onednn(visual)
    assert replaced == 12 * 3  # per block: attention, c_fc (GELU fused), c_proj
    x = _randn(2, 3, 224, 224)
    with torch.inference_mode():
        a, b = original(x), visual(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_onednn_mode_follows_the_setting() -> None:
    assert dask.config.get("imgcurator.models.onednn") == "auto"  # the shipped default
    assert (onednn_mode("auto"), onednn_mode("AUTO"), onednn_mode(True), onednn_mode(False)) == ("measure",) * 2 + (
        "on", "off")
    with pytest.raises(ValueError, match="auto, true or false, not 'fast'"):
        onednn_mode("fast")


def test_onednn_mode_is_off_without_the_kernels(monkeypatch) -> None:
    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    assert onednn_mode("auto") == onednn_mode(True) == "off"


def test_time_packing_times_every_replaceable_layer_and_leaves_the_module_alone() -> None:
    torch.manual_seed(2)
    block = _Block().eval()
    before = copy.deepcopy(block)
    x = _randn(1, 5, 16)
    timing = time_packing(block, x, batch=4, repeats=2)
    assert timing.layers == 4                   # what use_onednn replaces: attn, mlp's two linears, tanh_mlp's
    assert timing.plain_ms > 0 and timing.packed_ms > 0
    assert not any(isinstance(m, (PackedLinear, PackedAttention)) for m in block.modules())
    assert not any(m._forward_pre_hooks for m in block.modules())
    with torch.inference_mode():
        torch.testing.assert_close(block(x), before(x))


class _Repeated(nn.Module):
    """The same layer shapes many times (as in a transformer), attention sequence-first, some padded."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList(nn.MultiheadAttention(16, 4) for _ in range(3))
        self.proj = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, E)
        padding = torch.zeros(x.shape[1], x.shape[0], dtype=torch.bool)
        for i, (attn, proj) in enumerate(zip(self.attn, self.proj)):
            x = x + attn(x, x, x, need_weights=False, key_padding_mask=padding if i == 2 else None)[0]
            x = proj(x)
        return x


def test_time_packing_times_the_whole_pass_both_ways_on_batch_copies() -> None:
    module = _Repeated().eval()
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append((type(m.proj[0]).__name__, type(m.attn[2]).__name__,
                                                                  tuple(args[0].shape))))
    timing = time_packing(module, _randn(7, 1, 16), batch=3, repeats=2, rounds=1)
    assert timing.layers == 6                   # 3 attentions (padded or not) + 3 linears
    assert timing.plain_ms > 0 and timing.packed_ms > 0
    # a warm-up pass and 2 timed passes of each form, taking turns, on 3 copies along the first dimension
    assert seen == [("Linear", "MultiheadAttention", (21, 1, 16)), ("PackedLinear", "PackedAttention", (21, 1, 16))] * 3
    assert type(module.proj[0]) is nn.Linear and type(module.attn[2]) is nn.MultiheadAttention


def _scripted_runs(monkeypatch, rounds_of_seconds: list[tuple[float, float]]) -> list[bool]:
    """Make _fastest_runs return (plain, packed) seconds, round after round; records each round's warm_up."""
    script = iter(rounds_of_seconds)
    calls = []

    def scripted(forms, repeats, warm_up=True):
        assert len(forms) == 2
        calls.append(warm_up)
        return list(next(script))

    monkeypatch.setattr(onednn, "_fastest_runs", scripted)
    return calls


def test_time_packing_times_a_close_call_again_and_keeps_the_fastest_of_the_rounds(monkeypatch) -> None:
    calls = _scripted_runs(monkeypatch, [
        (1.00, 1.01),   # round 1: packed 1% slower: too close to call
        (1.02, 0.90),   # round 2: fastest of both rounds 1.00 against 0.90: 10% apart, decided
        (9.0, 9.0),     # never reached
    ])
    timing = time_packing(_Repeated().eval(), _randn(7, 1, 16), batch=2, rounds=3)
    assert calls == [True, False]               # only the first round warms up
    assert timing.layers == 6 and timing.packed_faster
    assert (round(timing.plain_ms), round(timing.packed_ms)) == (500, 450)   # per copy of the sample


def test_time_packing_stops_after_one_round_when_it_is_clear_and_after_rounds_when_it_stays_close(monkeypatch) -> None:
    calls = _scripted_runs(monkeypatch, [(1.0, 2.0)])
    assert not time_packing(_Repeated().eval(), _randn(7, 1, 16), batch=1).packed_faster
    assert len(calls) == 1
    calls = _scripted_runs(monkeypatch, [(1.0, 1.0)] * 5)
    timing = time_packing(_Repeated().eval(), _randn(7, 1, 16), batch=1, rounds=3)
    assert len(calls) == 3 and timing.plain_ms == timing.packed_ms == 1000 and not timing.packed_faster


@pytest.mark.parametrize("packed_faster", [True, False])
def test_auto_keeps_the_kernels_that_measured_faster(packed_faster, tmp_path, monkeypatch) -> None:
    timing = KernelTiming(plain_ms=2.0, packed_ms=1.0 if packed_faster else 3.0, layers=6)
    measured = []

    def fake_time_packing(module, sample):
        measured.append(tuple(sample.shape))
        return timing

    monkeypatch.setattr(encoder_module, "time_packing", fake_time_packing)
    model = load_clip(make_tiny_model_dir(tmp_path / "m"))    # the default setting: auto
    assert measured == [(1, 3, 32, 32)]                       # timed on one image of the model's input size
    assert model.kernel_timing == timing
    assert (model.onednn_layers > 0) is packed_faster
    with dask.config.set({"imgcurator.models.onednn": True}):
        forced = load_clip(make_tiny_model_dir(tmp_path / "m2"))
    assert forced.onednn_layers > 0 and forced.kernel_timing is None and len(measured) == 1


def test_auto_measures_once_per_machine_and_model_then_remembers(tmp_path, monkeypatch) -> None:
    """A second load (another worker, a re-run) reuses the first one's choice: same kernels, same bits."""
    from dask_imgcurator.models.clip import _load_visual

    calls = []

    def counting(module, sample):
        calls.append(1)
        return KernelTiming(plain_ms=2.0, packed_ms=1.0, layers=3)

    monkeypatch.setattr(encoder_module, "time_packing", counting)
    ref = make_tiny_model_dir(tmp_path / "m")
    first = LoadedModel(*_load_visual(ref), onednn="measure")
    second = LoadedModel(*_load_visual(ref), onednn="measure")
    assert len(calls) == 1 and first.onednn_layers == second.onednn_layers > 0
    assert second.kernel_timing == first.kernel_timing
    stored = json.loads((Path(os.environ["IMGCURATOR_HOME"]) / "kernel-timings.json").read_text())
    (key,) = stored
    assert key.startswith(f"{first.info.name}|fp32|{torch.get_num_threads()} threads|")
    assert stored[key] == {"plain_ms": 2.0, "packed_ms": 1.0, "layers": 3}
    LoadedModel(*_load_visual(ref), precision="bf16", onednn="measure")  # another key: measured afresh
    assert len(calls) == 2


def test_remembered_kernels_are_keyed_by_the_instruction_set_too(tmp_path, monkeypatch) -> None:
    """Two machines that report the same model name ("AMD EPYC" in VMs of AVX2 and AVX-512 hosts alike)
    but run other kernels each measure their own choice."""
    from dask_imgcurator.models.clip import _load_visual

    calls = []

    def counting(module, sample):
        calls.append(1)
        return KernelTiming(plain_ms=2.0, packed_ms=1.0, layers=3)

    monkeypatch.setattr(encoder_module, "time_packing", counting)
    monkeypatch.setenv("IMGCURATOR_HOME", str(tmp_path / "home"))  # a machine that has measured nothing yet
    ref = make_tiny_model_dir(tmp_path / "m")
    LoadedModel(*_load_visual(ref), onednn="measure")
    assert len(calls) == 1
    here = encoder_module.cpu_isa()
    other = "AVX2" if here != "AVX2" else "AVX512+avx512_bf16"  # whichever this host is not
    monkeypatch.setattr(encoder_module, "cpu_isa", lambda: other)
    LoadedModel(*_load_visual(ref), onednn="measure")
    LoadedModel(*_load_visual(ref), onednn="measure")
    assert len(calls) == 2
    keys = json.loads((tmp_path / "home" / "kernel-timings.json").read_text())
    assert any(f" {here} x" in key for key in keys) and any(f" {other} x" in key for key in keys)


def test_cpu_isa_names_torchs_capability_and_the_kernel_flags_present(monkeypatch) -> None:
    encoder_module.cpu_isa.cache_clear()
    encoder_module.cpu_flags.cache_clear()
    monkeypatch.setattr(encoder_module, "_cpuinfo_field",
                        lambda name: "fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16" if name == "flags" else "")
    try:
        assert encoder_module.cpu_flags() >= {"avx2", "avx512_bf16", "amx_bf16"}
        assert encoder_module.cpu_isa() == f"{torch.backends.cpu.get_cpu_capability()}+avx512_bf16+amx_bf16"
    finally:
        encoder_module.cpu_isa.cache_clear()
        encoder_module.cpu_flags.cache_clear()


def test_remembered_timing_reads_what_it_wrote_and_survives_a_damaged_file(tmp_path) -> None:
    path = tmp_path / "timings.json"
    timings = iter([KernelTiming(1.0, 2.0, 4), KernelTiming(5.0, 3.0, 4)])
    assert remembered_timing("a", lambda: next(timings), path) == KernelTiming(1.0, 2.0, 4)
    assert remembered_timing("a", lambda: pytest.fail("measured again"), path) == KernelTiming(1.0, 2.0, 4)
    path.write_text("{not json")
    assert remembered_timing("a", lambda: next(timings), path) == KernelTiming(5.0, 3.0, 4)
    assert json.loads(path.read_text()) == {"a": {"plain_ms": 5.0, "packed_ms": 3.0, "layers": 4}}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    "bad",
    [
        {"plain_ms": None, "packed_ms": 1.0, "layers": 3},
        {"plain_ms": "0.4", "packed_ms": 1.0, "layers": 3},
        {"plain_ms": 1.0, "packed_ms": 2.0, "layers": 3, "method": "v2"},
        {"plain_ms": 1.0, "packed_ms": 2.0},
        {"plain_ms": 1.0, "packed_ms": 2.0, "layers": True},
        [1.0, 2.0, 3],
    ],
)
def test_a_bad_timing_entry_is_measured_again_and_the_others_kept(tmp_path, bad) -> None:
    path = tmp_path / "timings.json"
    good = {"plain_ms": 5.0, "packed_ms": 1.0, "layers": 3}
    path.write_text(json.dumps({"bad": bad, "good": good}))
    assert remembered_timing("good", lambda: pytest.fail("measured again"), path) == KernelTiming(5.0, 1.0, 3)
    timing = remembered_timing("bad", lambda: KernelTiming(9.0, 1.0, 3), path)
    assert timing == KernelTiming(9.0, 1.0, 3) and timing.packed_faster
    assert json.loads(path.read_text()) == {"bad": {"plain_ms": 9.0, "packed_ms": 1.0, "layers": 3}, "good": good}


def test_remembered_timing_measures_each_time_where_it_cannot_write(tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    calls = []
    for _ in range(2):
        remembered_timing("a", lambda: calls.append(1) or KernelTiming(1.0, 2.0, 1), blocker / "timings.json")
    assert len(calls) == 2


_MEASURE_IN_A_PROCESS = r"""
import sys, time
from pathlib import Path
from dask_imgcurator.models.onednn import KernelTiming, remembered_timing

def measure():
    with open(sys.argv[2], "a") as f:
        f.write("measured\n")
    time.sleep(1.0)
    return KernelTiming(float(sys.argv[3]), 1.0, 2)

print(remembered_timing("vit", measure, Path(sys.argv[1])).plain_ms)
"""


def test_processes_starting_together_measure_once(tmp_path) -> None:
    import subprocess
    import sys

    path, log = tmp_path / "timings.json", tmp_path / "measured.log"
    procs = [subprocess.Popen([sys.executable, "-c", _MEASURE_IN_A_PROCESS, str(path), str(log), str(i + 2)],
                              stdout=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert log.read_text().count("measured") == 1
    assert len(set(results)) == 1                     # all three use the one measurement


def test_kernel_timing_with_nothing_to_pack_keeps_pytorchs_layers() -> None:
    assert not KernelTiming(plain_ms=0.0, packed_ms=0.0, layers=0).packed_faster
    assert KernelTiming(plain_ms=2.0, packed_ms=1.0, layers=1).packed_faster


def test_loaded_clip_packed_equals_plain_and_can_opt_out(tmp_path: Path, onednn_on) -> None:
    ref = make_tiny_model_dir(tmp_path / "m")
    fast = load_clip(ref)
    assert fast.onednn_layers > 0
    with dask.config.set({"imgcurator.models.onednn": False}):
        plain = load_clip(make_tiny_model_dir(tmp_path / "m2"))
    assert plain.onednn_layers == 0
    x = _randn(4, 3, 32, 32)
    torch.testing.assert_close(fast.encode(x), plain.encode(x), rtol=1e-4, atol=1e-5)
    bf16 = load_clip(ref, precision="bf16")
    assert (bf16.onednn_layers > 0) == (torch.bfloat16 in onednn_dtypes())
    cosine = (bf16.encode(x) * plain.encode(x)).sum(dim=1)
    assert cosine.min() > 0.99


class _ReadsItsWeight(nn.Module):
    """A module that uses its Linear's weight directly: the rewrite must not be kept for it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.proj.weight.T


def test_loaded_model_probe_catches_a_module_the_rewrite_breaks() -> None:
    from dask_imgcurator.decode.base import PreprocessSpec

    info = ModelInfo("reads-weight", 4, PreprocessSpec(size=8))
    with pytest.raises(OneDnnMismatch, match="fails with oneDNN"):
        LoadedModel(_ReadsItsWeight(), info, onednn=True)
    assert LoadedModel(_ReadsItsWeight(), info).onednn_layers == 0


def test_load_clip_falls_back_when_the_probe_disagrees(tmp_path: Path, monkeypatch, onednn_on) -> None:
    def corrupting(module: nn.Module) -> int:
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(-1.0)
        return 1

    monkeypatch.setattr(encoder_module, "use_onednn", corrupting)
    ref = make_tiny_model_dir(tmp_path / "m")
    with pytest.warns(RuntimeWarning, match="another embedding"):
        model = load_clip(ref)
    assert model.onednn_layers == 0
    with dask.config.set({"imgcurator.models.onednn": False}):
        plain = load_clip(make_tiny_model_dir(tmp_path / "m2"))
    x = _randn(2, 3, 32, 32)
    torch.testing.assert_close(model.encode(x), plain.encode(x))


def test_bf16_layers_are_left_alone_on_cpus_without_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onednn, "onednn_dtypes", lambda: (torch.float32,))
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).to(torch.bfloat16)
    assert use_onednn(model) == 0 and isinstance(model[0], nn.Linear)
    assert use_onednn(model.float()) == 1 and isinstance(model[0], PackedLinear)


def test_load_clip_falls_back_when_a_kernel_is_missing(tmp_path: Path, monkeypatch, onednn_on) -> None:
    def missing_kernel(module: nn.Module) -> int:
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    monkeypatch.setattr(encoder_module, "use_onednn", missing_kernel)
    with pytest.warns(RuntimeWarning, match="cannot use oneDNN layers here: .*avx512bw"):
        model = load_clip(make_tiny_model_dir(tmp_path / "m"))
    assert model.onednn_layers == 0 and model.encode(_randn(1, 3, 32, 32)).shape == (1, model.embed_dim)


def test_a_loaded_model_with_packed_layers_pickles(tmp_path: Path, onednn_on) -> None:
    """Dask ships models between processes (``client.run`` results, user closures): packed weights travel plain."""
    import pickle

    model = load_clip(make_tiny_model_dir(tmp_path / "m"))
    assert model.onednn_layers > 0
    copied = pickle.loads(pickle.dumps(model))
    assert copied.onednn_layers == model.onednn_layers
    assert isinstance(copied._forward.transformer.resblocks[0].attn, PackedAttention)
    x = _randn(3, 3, 32, 32)
    torch.testing.assert_close(copied.encode(x), model.encode(x))


@pytest.mark.parametrize("dtypes, warns", [((torch.float32,), True), ((torch.float32, torch.bfloat16), False)])
def test_bf16_on_a_cpu_without_bf16_kernels_warns_that_it_is_slow(dtypes, warns, monkeypatch) -> None:
    import warnings

    from dask_imgcurator.decode.base import PreprocessSpec

    monkeypatch.setattr(encoder_module, "onednn_dtypes", lambda: dtypes)
    info = ModelInfo("tower", 4, PreprocessSpec(size=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LoadedModel(_ReadsItsWeight(), info, precision="bf16")
        LoadedModel(_ReadsItsWeight(), info, precision="fp32")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == warns and all("tower: precision 'bf16' on a CPU without bf16 kernels" in m for m in messages)
