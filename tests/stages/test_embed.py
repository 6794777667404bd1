import os
import io
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dask_imgcurator as ic
from dask_imgcurator.decode import PreprocessSpec
from dask_imgcurator.models import ClipRef, WeightsNotFoundError, clear_cache, custom_model, load_head, make_tiny_model_dir
from dask_imgcurator.schema import embedding_matrix
from dask_imgcurator.stages import embed as embed_module
from dask_imgcurator.stages.embed import embed, embed_partition
from dask_imgcurator.stages.score import score
from tests.conftest import write_tar

SPEC = PreprocessSpec(size=16)


def colour_of(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91 + 20) % 256, (i * 53 + 200) % 256


def png(colour, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


class ChannelMeans(torch.nn.Module):
    """Deterministic stand-in encoder: the image's mean normalised colour, plus a constant."""

    def forward(self, x):
        means = x.mean(dim=(2, 3))
        return torch.cat([means, torch.ones(len(x), 1)], dim=1)


def expected_embedding(colour) -> np.ndarray:
    v = np.array([(c / 255 - m) / s for c, m, s in zip(colour, SPEC.mean, SPEC.std)] + [1.0], dtype=np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture
def colour_shards(tmp_path):
    """Two shards of solid-colour PNGs; key k-i has colour_of(i)."""
    for s, (lo, hi) in enumerate(((0, 7), (7, 12))):
        write_tar(tmp_path / f"c-{s}.tar", [(f"k-{i:03d}.png", png(colour_of(i))) for i in range(lo, hi)])
    return tmp_path


def stand_in():
    return custom_model(ChannelMeans, SPEC, embed_dim=4, name="channel-means")


@pytest.mark.parametrize("decoder", ["pillow", "dali"])
def test_embeddings_align_with_keys(colour_shards, decoder):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    ddf = ic.read_webdataset(str(colour_shards / "*.tar"))
    shuffled = ddf.map_partitions(lambda df: df.iloc[::-1], meta=ddf._meta)
    out = embed(shuffled, stand_in(), heads=(), batch_size=3, decoder=decoder).compute()
    assert out["error"].isna().all()
    got = embedding_matrix(out["embedding"])
    for key, row in zip(out["key"], got):
        np.testing.assert_allclose(row, expected_embedding(colour_of(int(key[2:]))), atol=2e-3)
    assert out["width"].tolist() == [40] * 12 and out["height"].tolist() == [30] * 12


def test_embedding_without_the_location_columns_fails_when_the_graph_is_built(colour_shards):
    ddf = ic.read_webdataset(str(colour_shards / "*.tar"))
    with pytest.raises(ValueError, match=r"embed needs the columns \['error'\] of read_webdataset"):
        embed(ddf[["key", "shard", "image_offset", "image_nbytes"]], stand_in(), heads=())
    with pytest.raises(ValueError, match=r"embed needs the columns \['shard', 'error'\]"):
        embed(ddf[["key", "image_offset", "image_nbytes"]], stand_in(), heads=())


def test_each_image_is_decoded_once(colour_shards, monkeypatch):
    clear_cache()
    decoded = []
    real = embed_module.make_decoder

    def counting(*args, **kwargs):
        inner = real(*args, **kwargs)

        class Counting:
            name = inner.name

            def decode(self, blobs):
                decoded.extend(blobs)
                return inner.decode(blobs)

        return Counting()

    monkeypatch.setattr(embed_module, "make_decoder", counting)
    out = embed(ic.read_webdataset(str(colour_shards)), stand_in(), heads=(), batch_size=4, decoder="pillow").compute()
    assert len(out) == 12 and len(decoded) == 12
    assert sorted(decoded) == sorted(png(colour_of(i)) for i in range(12))
    clear_cache()


def test_draft_option_reaches_the_decoder(colour_shards, monkeypatch):
    clear_cache()
    drafts = []
    real = embed_module.make_decoder
    monkeypatch.setattr(embed_module, "make_decoder", lambda *a, **kw: drafts.append(kw["draft"]) or real(*a, **kw))
    for draft in (True, False):
        ddf = ic.read_webdataset(str(colour_shards))
        embed(ddf, stand_in(), heads=(), decoder="pillow", draft=draft).compute(scheduler="sync")
    assert drafts == [True, False]  # one decoder per setting, each reused across partitions
    clear_cache()


def test_prefetching_and_foreground_decoding_give_the_same_batches(colour_shards):
    """The GPU path decodes one batch ahead in a thread, the CPU path between batches: same output."""
    frame = ic.read_webdataset(str(colour_shards / "c-0.tar")).compute()
    todo = np.arange(len(frame))[::-1].copy()
    decoder = embed_module.make_decoder(SPEC, backend="pillow")
    runs = [list(embed_module._decoded_batches(frame, todo, decoder, 3, prefetch)) for prefetch in (False, True)]
    assert [len(rows) for rows, _ in runs[0]] == [3, 3, 1]
    for (rows_a, a), (rows_b, b) in zip(*runs, strict=True):
        np.testing.assert_array_equal(rows_a, rows_b)
        assert torch.equal(a.pixels, b.pixels) and a.errors == b.errors


def test_gpu_path_pins_cpu_decoded_pixels(colour_shards, monkeypatch):
    frame = ic.read_webdataset(str(colour_shards / "c-0.tar")).compute()
    decoder = embed_module.make_decoder(SPEC, backend="pillow")
    pinned = []

    def fake_pin(self):  # pin_memory itself needs CUDA
        pinned.append(threading.get_ident())
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    todo = np.arange(len(frame))
    plain = list(embed_module._decoded_batches(frame, todo, decoder, 3, prefetch=True))
    assert pinned == []
    pins = list(embed_module._decoded_batches(frame, todo, decoder, 3, prefetch=True, pin=True))
    assert len(pinned) == 3 and threading.get_ident() not in pinned  # pinned in the decode thread
    for (_, a), (_, b) in zip(plain, pins, strict=True):
        assert torch.equal(a.pixels, b.pixels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path_pixels_are_page_locked(colour_shards):
    frame = ic.read_webdataset(str(colour_shards / "c-0.tar")).compute()
    decoder = embed_module.make_decoder(SPEC, backend="pillow")
    batches = list(embed_module._decoded_batches(frame, np.arange(len(frame)), decoder, 3, prefetch=True, pin=True))
    assert batches and all(batch.pixels.is_pinned() for _, batch in batches)


def test_cpu_decoders_get_the_torch_threads(monkeypatch):
    pytest.importorskip("nvidia.dali")
    clear_cache()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    decoder = embed_module._cached_decoder(SPEC, "dali", "cpu")
    assert decoder.num_threads == 3
    pillow = embed_module._cached_decoder(SPEC, "pillow", "cpu")
    assert pillow.name == "pillow" and pillow.num_threads == 3
    clear_cache()


def test_dask_result_equals_the_partition_function_on_all_rows(tmp_path):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=3, samples_per_shard=5)
    ref = make_tiny_model_dir(tmp_path / "models")
    ddf = ic.read_webdataset(str(tmp_path / "in"))
    lazy = embed(ddf, ref, decoder="pillow")
    assert set(lazy.columns) >= {"embedding", "width", "height", "aesthetic_score", "nsfw_score", "error"}
    got = lazy.compute()
    config = lazy.dask  # graph exists without computing the model on the client
    assert config
    from dask_imgcurator.stages.embed import EmbedConfig
    from dask_imgcurator.models import head_spec

    whole = embed_partition(
        ddf.compute(), EmbedConfig(ref, (head_spec("aesthetic"), head_spec("nsfw")), decoder="pillow")
    )
    pd.testing.assert_frame_equal(got.reset_index(drop=True), whole.reset_index(drop=True), check_exact=False, atol=1e-5)


def test_heads_match_a_direct_torch_computation(tmp_path):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=6)
    ref = make_tiny_model_dir(tmp_path / "models")
    out = embed(ic.read_webdataset(str(tmp_path / "in")), ref, decoder="pillow").compute()
    emb = torch.from_numpy(embedding_matrix(out["embedding"]).copy())
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "models" / "heads" / "aesthetic" / f"{ref.head_family}.safetensors"))
    x = emb
    for i in (0, 2, 4, 6, 7):  # the LAION v2 MLP: linear layers without activations
        x = x @ weights[f"layers.{i}.weight"].T + weights[f"layers.{i}.bias"]
    np.testing.assert_allclose(out["aesthetic_score"].to_numpy(), x[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    nsfw = load_head("nsfw", 32, ref.head_family, model_dir=ref.model_dir)
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), nsfw(emb).numpy(), atol=1e-6)
    assert ((out["nsfw_score"] >= 0) & (out["nsfw_score"] <= 1)).all()


def test_bad_images_cost_one_row_each(tmp_path):
    good = [(f"g{i}.png", png(colour_of(i))) for i in range(4)]
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, "JPEG")
    bad = [("b-trunc.jpg", jpeg.getvalue()[:200]), ("b-zero.jpg", b""), ("b-junk.png", b"not an image")]
    write_tar(tmp_path / "mixed.tar", good[:2] + bad + good[2:] + [("t-only.txt", b"no image here")])
    out = embed(ic.read_webdataset(str(tmp_path / "mixed.tar")), stand_in(), heads=(), batch_size=8).compute()
    errors = dict(zip(out["key"], out["error"]))
    assert all(pd.isna(errors[f"g{i}"]) for i in range(4))
    assert all(isinstance(errors[k], str) and errors[k] for k in ("b-trunc", "b-zero", "b-junk"))
    assert "no image member" in errors["t-only"]
    failed = out[out["error"].notna()]
    assert failed["embedding"].isna().all()
    ok = out[out["error"].isna()]
    for key, row in zip(ok["key"], embedding_matrix(ok["embedding"])):
        np.testing.assert_allclose(row, expected_embedding(colour_of(int(key[1:]))), atol=2e-3)


def test_score_reruns_heads_on_stored_embeddings_and_checks_width(tmp_path):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=2, samples_per_shard=4)
    ref = make_tiny_model_dir(tmp_path / "models")
    embedded = embed(ic.read_webdataset(str(tmp_path / "in")), ref, decoder="pillow")
    embedded.to_parquet(str(tmp_path / "emb"), write_index=False)
    stored = ic.read_parquet(str(tmp_path / "emb"))
    rescored = score(stored.drop(columns=["aesthetic_score"]), heads=("aesthetic",), clip_name=ref.head_family,
                     model_dir=ref.model_dir).compute()
    np.testing.assert_allclose(rescored["aesthetic_score"].to_numpy(), stored["aesthetic_score"].compute().to_numpy(), atol=1e-6)
    from safetensors.torch import save_file

    from dask_imgcurator.models import AestheticHead

    l14 = AestheticHead(768, clip_name="ViT-L-14-openai")
    save_file(l14.state_dict(), str(tmp_path / "models" / "heads" / "aesthetic" / "ViT-L-14-openai.safetensors"))
    with pytest.raises(ValueError, match="expects 768-d embeddings .* but got 32-d"):
        score(stored, heads=("aesthetic",), clip_name="ViT-L-14-openai", model_dir=ref.model_dir, offline=True).compute()


def test_missing_weights_offline_say_how_to_prepare_a_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCURATOR_HOME", str(tmp_path / "home"))
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=2)
    ddf = embed(ic.read_webdataset(str(tmp_path / "in")), ClipRef("ViT-B-32", "openai", model_dir=str(tmp_path / "empty"), offline=True))
    with pytest.raises(WeightsNotFoundError, match="imgcurator models download --model-dir"):
        ddf.compute()


def test_embed_is_lazy_and_never_loads_models_on_the_client(tmp_path, monkeypatch):
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=1, samples_per_shard=2)
    ref = make_tiny_model_dir(tmp_path / "models")
    monkeypatch.setattr(ClipRef, "load", lambda *a, **k: pytest.fail("model loaded while building the graph"))
    lazy = embed(ic.read_webdataset(str(tmp_path / "in")), ref)
    assert lazy.npartitions == 1 and "embedding" in lazy.columns


@pytest.mark.parametrize("device,precision", [
    ("cpu", "bf16"),
    pytest.param("cuda", "fp32", marks=pytest.mark.gpu),
    pytest.param("cuda", "bf16", marks=pytest.mark.gpu),
])
def test_device_and_precision_keep_embeddings_scores_and_errors(tmp_path, device, precision):
    """Against CPU fp32 on the same shards (broken samples included): on a GPU, DALI decodes `mixed`."""
    ic.make_demo_shards(str(tmp_path / "in"), n_shards=2, samples_per_shard=12, broken=True)
    ref = make_tiny_model_dir(tmp_path / "models")
    ddf = ic.read_webdataset(str(tmp_path / "in"))
    base = embed(ddf, ref, device="cpu", precision="fp32", draft=False).compute()
    got = embed(ddf, ref, device=device, precision=precision, draft=False).compute()
    assert got["key"].tolist() == base["key"].tolist()
    ok = base["error"].isna().to_numpy()
    assert got["error"].isna().tolist() == ok.tolist() and 0 < ok.sum() < len(ok)
    assert got["width"].tolist() == base["width"].tolist() and got["height"].tolist() == base["height"].tolist()
    a, b = embedding_matrix(base["embedding"][ok]), embedding_matrix(got["embedding"][ok])
    cosine = (a * b).sum(axis=1)
    assert cosine.min() >= 0.99, cosine
    emb = torch.from_numpy(b.copy())
    for name in ("aesthetic", "nsfw"):  # the heads ran on those embeddings, on that device
        head = load_head(name, emb.shape[1], ref.head_family, model_dir=ref.model_dir)
        with torch.no_grad():
            expected = head(emb).float().numpy().ravel()
        scores = got[f"{name}_score"].to_numpy()
        np.testing.assert_allclose(scores[ok], expected, rtol=1e-4, atol=1e-4)
        assert np.isnan(scores[~ok]).all()


def test_gpu_decoders_get_the_task_share_of_the_cores_and_the_model_batch(monkeypatch):
    pytest.importorskip("nvidia.dali")
    clear_cache()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    decoder = embed_module._cached_decoder(SPEC, "dali", "cuda", batch_size=256)  # built lazily: no GPU needed
    assert decoder.name == "dali-mixed" and decoder.num_threads == 12 and decoder.batch_size == 256
    pillow = embed_module._cached_decoder(SPEC, "pillow", "cuda", batch_size=256)
    assert pillow.name == "pillow" and pillow.num_threads == 12
    clear_cache()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert embed_module._task_cpu_share() == 2  # nvJPEG's host stage and Pillow's share need a thread each


def test_gpu_decode_threads_are_divided_among_the_workers_task_threads(monkeypatch):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        cpus = len(os.sched_getaffinity(0))
        assert client.submit(embed_module._task_cpu_share, pure=False).result() == max(2, cpus // 3)


@pytest.mark.parametrize(("option", "value", "phrase"), [
    ("batch_size", 0, "batch_size must be a whole number of at least 1, not 0"),
    ("batch_size", -1, "batch_size must be a whole number of at least 1"),  # it skipped every image unmarked
    ("max_pixels", 0, "max_pixels must be"),
    ("precision", "fp8", "precision must be one of 'fp32', 'bf16', 'fp16'"),
    ("decoder", "opencv", "decoder must be one of 'auto', 'dali', 'pillow'"),
    ("device", "tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
])
def test_bad_options_fail_when_the_graph_is_built(colour_shards, option, value, phrase):
    with pytest.raises(ValueError, match=phrase):
        ic.embed(ic.read_webdataset(str(colour_shards)), stand_in(), heads=(), **{option: value})
