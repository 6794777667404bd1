"""DaliDecoder: bad-image matrix, routing to Pillow, recovery after DALI errors, batch shapes."""
from __future__ import annotations

import dataclasses
import io
import threading

import pytest
import torch

pytest.importorskip("nvidia.dali")

from dask_imgcurator.decode import DaliDecoder, PillowDecoder, dali_available, make_decoder, probe_image  # noqa: E402
from dask_imgcurator.decode.dali import _dali_handles  # noqa: E402

from .conftest import BAD_CASES, encode, normalised_white, photo, transparent_png, unusual_images  # noqa: E402


@pytest.fixture
def dali(spec):
    return DaliDecoder(spec, batch_size=8)


def _alone(dec, blobs):
    """Each blob decoded in its own decode() call."""
    return torch.cat([dec.decode([b]).pixels for b in blobs])


def test_bad_image_matrix(image_case, spec):
    spec = dataclasses.replace(spec, **image_case.spec_overrides)
    dec = DaliDecoder(spec)
    out = dec.decode([image_case.blob])
    image_case.verify(out, spec)
    if image_case.error is not None and "DALI" not in out.errors[0]:
        assert dec._pipe is None  # refused by the header probe: DALI never ran


def test_transparent_pixels_are_white(dali, spec):
    pixels = dali.decode([transparent_png()]).pixels[0]
    assert torch.allclose(pixels, normalised_white(spec).expand_as(pixels), atol=1e-6)


def test_truncated_jpeg_error_names_dali(dali, truncated_jpeg):
    out = dali.decode([truncated_jpeg])
    assert out.errors[0].startswith("truncated or corrupt JPEG: image file is truncated")  # Pillow's retry
    assert out.errors[0].endswith("; DALI decoders.image error: Failed to decode sample")
    assert (out.width[0], out.height[0]) == (640, 480)


def test_pillow_rescues_what_dali_refuses(dali, photo_jpegs, monkeypatch):
    refused = photo_jpegs[1]
    run = dali._run

    def picky_run(blobs, infos):
        if refused in blobs:
            raise RuntimeError("Critical error in pipeline:\nencountered:\n\nUnsupported sample #3")
        return run(blobs, infos)

    monkeypatch.setattr(dali, "_run", picky_run)
    out = dali.decode(photo_jpegs[:3])
    assert out.errors == [None] * 3
    assert torch.equal(out.pixels[1], PillowDecoder(dali.spec, draft=False).decode([refused]).pixels[0])


@pytest.mark.parametrize("name", [name for name, case in sorted(BAD_CASES.items()) if case().error is None])
def test_matrix_cases_agree_with_pillow(name, spec):
    blob = BAD_CASES[name]().blob
    a = DaliDecoder(spec).decode([blob]).pixels
    b = PillowDecoder(spec, draft=False).decode([blob]).pixels
    assert (a - b).abs().max() < 0.1


def _spy_on_pillow(dec: DaliDecoder, monkeypatch) -> list[bytes]:
    """The blobs a CPU DaliDecoder hands to its PillowDecoder, in order."""
    routed: list[bytes] = []
    decode_into = dec._pillow.decode_into
    monkeypatch.setattr(dec._pillow, "decode_into", lambda blobs, rows: routed.extend(blobs) or decode_into(blobs, rows))
    return routed


@pytest.mark.parametrize("name", sorted(unusual_images()))
def test_unusual_images_go_to_pillow(spec, name, monkeypatch):
    blob = unusual_images()[name]
    dec = DaliDecoder(spec)
    routed = _spy_on_pillow(dec, monkeypatch)
    out = dec.decode([encode(photo(80, 60)), blob])
    assert routed == [blob]
    assert out.errors == [None, None]
    assert torch.equal(out.pixels[1:], PillowDecoder(spec, draft=False).decode([blob]).pixels)


def test_webp_goes_to_pillow_on_the_cpu_only(spec, monkeypatch):
    jpeg, webp = encode(photo(320, 240)), encode(photo(320, 240, seed=2), "WEBP")
    dec = DaliDecoder(spec)
    routed = _spy_on_pillow(dec, monkeypatch)
    out = dec.decode([jpeg, webp])
    assert routed == [webp]
    assert out.errors == [None, None]
    assert torch.equal(out.pixels[1], PillowDecoder(spec).decode([webp]).pixels[0])
    info = probe_image(webp)
    assert _dali_handles(info, "gpu") and not _dali_handles(info, "cpu")  # the GPU pipeline keeps WebP


def test_tiffs_go_to_pillow(spec, monkeypatch):
    """Pillow applies a TIFF's orientation tag when it opens it (the header size is the rotated one); DALI does not."""
    tiff = encode(photo(120, 90, seed=4), "TIFF", tiffinfo={274: 6})
    info = probe_image(tiff)
    assert not _dali_handles(info, "cpu") and not _dali_handles(info, "gpu")
    dec = DaliDecoder(spec)
    routed = _spy_on_pillow(dec, monkeypatch)
    out = dec.decode([encode(photo(80, 60)), tiff])
    assert routed == [tiff] and out.errors == [None, None]
    assert torch.equal(out.pixels[1], PillowDecoder(spec).decode([tiff]).pixels[0])


def test_dali_pixels_of_another_size_than_the_header_go_to_pillow(spec, monkeypatch):
    import dask_imgcurator.decode.dali as dali_module

    tiff = encode(photo(120, 90, seed=4), "TIFF", tiffinfo={274: 6})  # DALI decodes 120x90, the header says 90x120
    monkeypatch.setattr(dali_module, "_DALI_CPU_FORMATS", dali_module._DALI_CPU_FORMATS | {"TIFF"})
    dec = DaliDecoder(spec)
    routed = _spy_on_pillow(dec, monkeypatch)
    out = dec.decode([tiff])
    assert dec._pipe is not None and routed == [tiff] and out.errors == [None]  # DALI first, then Pillow
    assert torch.equal(out.pixels, PillowDecoder(spec).decode([tiff]).pixels)


def test_large_jpegs_go_to_pillow_draft_on_the_cpu(spec, monkeypatch):
    small, big_jpeg = encode(photo(640, 480)), encode(photo(1600, 900, seed=1))
    big_png = encode(photo(1600, 900), "PNG")
    dec = DaliDecoder(spec, num_threads=2)
    assert dec._pillow.draft and dec._pillow.num_threads == 2
    routed = _spy_on_pillow(dec, monkeypatch)
    out = dec.decode([small, big_jpeg, big_png])
    assert routed == [big_jpeg]  # shorter side 900 >= 4 * 224; the 900 px PNG has no reduced decode
    assert out.errors == [None] * 3
    assert torch.equal(out.pixels[1], PillowDecoder(spec, draft=True).decode([big_jpeg]).pixels[0])
    assert (out.pixels[1] - DaliDecoder(spec, draft=False).decode([big_jpeg]).pixels[0]).abs().max() < 0.15

    whole = DaliDecoder(spec, draft=False)
    for method in ("decode", "decode_into"):
        monkeypatch.setattr(whole._pillow, method, lambda *args: pytest.fail("nothing should go to Pillow"))
    assert whole.decode([small, big_jpeg, big_png]).errors == [None] * 3


def test_truncated_large_jpeg_costs_only_its_row(dali, photo_jpegs):
    big = encode(photo(1600, 900, seed=2))
    truncated = big[: len(big) // 2]
    out = dali.decode([photo_jpegs[0], truncated, big, encode(photo(900, 1600, seed=3).convert("L"))])
    assert out.ok.tolist() == [True, False, True, True]
    assert out.errors[1].startswith("truncated or corrupt JPEG")
    assert (out.width[1], out.height[1]) == (1600, 900)
    assert torch.equal(out.pixels[1], PillowDecoder(dali.spec).decode([big]).pixels[0])


def test_pillow_share_is_decoded_while_dali_runs(spec, monkeypatch):
    dec = DaliDecoder(spec)
    pillow_started = threading.Event()
    pillow_threads, overlapped = [], []
    pillow_decode, dali_run = dec._pillow.decode_into, dec._run

    def pillow(blobs, rows):
        pillow_threads.append(threading.get_ident())
        pillow_started.set()
        return pillow_decode(blobs, rows)

    def dali(blobs, infos):
        overlapped.append(pillow_started.wait(timeout=30))  # False if Pillow only starts after DALI
        return dali_run(blobs, infos)

    monkeypatch.setattr(dec._pillow, "decode_into", pillow)
    monkeypatch.setattr(dec, "_run", dali)
    blobs = [encode(photo(640, 480)), encode(photo(1600, 900, seed=1)), encode(photo(80, 60).convert("CMYK"))]
    out = dec.decode(blobs)
    assert overlapped == [True] and threading.get_ident() not in pillow_threads
    assert out.errors == [None] * 3
    assert torch.equal(out.pixels[1:], PillowDecoder(spec, draft=True).decode(blobs[1:]).pixels)


def test_crops_are_resized_on_the_decoders_threads(spec, photo_jpegs, monkeypatch):
    """A serial resize loop would leave all but one of a many-threaded decoder's cores idle."""
    import dask_imgcurator.decode.dali as dali_module

    threads, barrier = set(), threading.Barrier(2, timeout=30)
    resize = dali_module.resize_center_crop

    def spy(*args, **kwargs):
        if threading.get_ident() not in threads:
            threads.add(threading.get_ident())
            barrier.wait()  # the first resize of each thread: passes only if two run at the same time
        return resize(*args, **kwargs)

    monkeypatch.setattr(dali_module, "resize_center_crop", spy)
    pooled = DaliDecoder(spec, num_threads=2).decode(photo_jpegs)
    assert len(threads) == 2 and threading.get_ident() not in threads
    monkeypatch.setattr(dali_module, "resize_center_crop", resize)
    alone = DaliDecoder(spec, num_threads=1).decode(photo_jpegs)
    assert torch.equal(pooled.pixels, alone.pixels) and pooled.errors == alone.errors


def test_gpu_decoder_keeps_large_jpegs(spec):
    from dask_imgcurator.decode.probe import probe_image

    info = probe_image(encode(photo(1600, 900)))
    assert DaliDecoder(spec)._drafts(info)
    assert not DaliDecoder(spec, device="gpu")._drafts(info)  # nvJPEG decodes on the GPU: nothing to save
    assert not DaliDecoder(spec, draft=False)._drafts(info)


def test_truncated_jpeg_mid_batch_then_recovery(dali, photo_jpegs, truncated_jpeg):
    good = photo_jpegs[:6]
    expected = _alone(DaliDecoder(dali.spec), good)
    out = dali.decode(good[:3] + [truncated_jpeg] + good[3:])
    assert out.ok.tolist() == [True, True, True, False, True, True, True]
    assert "DALI" in out.errors[3]
    assert torch.equal(out.pixels, expected)
    # the pipeline was rebuilt and keeps working, and errors do not leak into later batches
    for _ in range(2):
        again = dali.decode(good)
        assert again.errors == [None] * 6
        assert torch.equal(again.pixels, expected)


def test_two_bad_images_in_one_batch(dali, photo_jpegs, truncated_jpeg):
    other_truncated = photo_jpegs[1][: len(photo_jpegs[1]) * 2 // 3]
    out = dali.decode([truncated_jpeg, photo_jpegs[2], other_truncated, b"", photo_jpegs[3]])
    assert out.ok.tolist() == [False, True, False, False, True]
    assert torch.equal(out.pixels, _alone(dali, [photo_jpegs[2], photo_jpegs[3]]))


@pytest.mark.parametrize("n", [0, 1, 3, 8, 11, 17])
def test_variable_batch_sizes(dali, n):
    blobs = [encode(photo(120 + 7 * i, 90 + 5 * i, seed=i)) for i in range(n)]
    out = dali.decode(blobs)  # batch_size=8: 11 and 17 are split, the last run smaller
    assert out.pixels.shape == (n, 3, 224, 224) and out.pixels.dtype == torch.float32
    assert out.errors == [None] * n
    assert out.width.tolist() == [120 + 7 * i for i in range(n)]
    if n:
        assert torch.equal(out.pixels[-1:], dali.decode(blobs[-1:]).pixels)


def test_pipeline_is_built_lazily_and_reused(dali, photo_jpegs):
    assert dali._pipe is None
    dali.decode(photo_jpegs[:2])
    pipe = dali._pipe
    dali.decode(photo_jpegs[2:5])
    assert dali._pipe is pipe


def test_make_decoder_picks_dali(spec):
    assert dali_available()
    assert make_decoder(spec).name == "dali-cpu"
    assert make_decoder(spec, backend="dali", device="gpu").name == "dali-mixed"  # built lazily: no GPU needed
    with pytest.raises(ValueError, match="device"):
        DaliDecoder(spec, device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_backend_matches_cpu(spec, photo_jpegs):
    gpu = DaliDecoder(spec, device="gpu")
    batch = photo_jpegs + [encode(photo(80, 60).convert("RGBA"), "PNG"), b""]
    out = gpu.decode(batch)
    assert gpu.name == "dali-mixed" and out.pixels.is_cuda
    assert out.ok.tolist() == [True] * (len(batch) - 1) + [False]
    cpu = DaliDecoder(spec, draft=False).decode(batch)
    # nvJPEG's IDCT differs slightly from libjpeg-turbo's
    diff = (out.pixels.cpu() - cpu.pixels).abs()
    assert diff.max() < 0.15 and diff.mean() < 0.01
    assert gpu.decode([]).pixels.is_cuda


def test_runs_are_split_by_pixel_budget(monkeypatch):
    from PIL import Image as PILImage

    from dask_imgcurator.decode import DaliDecoder, PreprocessSpec

    blobs = []
    for side in (300, 300, 300, 40):
        buf = io.BytesIO()
        PILImage.new("RGB", (side, side), (side % 256, 10, 20)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    decoder = DaliDecoder(PreprocessSpec(size=32), batch_size=64, max_batch_pixels=200_000, draft=False)
    runs = []
    real = decoder._run
    monkeypatch.setattr(decoder, "_run", lambda b, infos: runs.append(len(b)) or real(b, infos))
    out = decoder.decode(blobs)
    assert runs == [2, 2]  # 300x300 = 90,000 px: two per run, then the third with the small one
    assert out.ok.all() and out.pixels.shape == (4, 3, 32, 32)


def test_jpeg_data_damaged_inside_the_image_is_where_dali_and_pillow_disagree(spec):
    """The difference README's Decoding section states: Pillow refuses a JPEG whose entropy-coded data
    ends before its last block, DALI fills the rest in and returns it (only printing libjpeg's warning).
    If a DALI release starts refusing them, both decoders agree and README's note can go."""
    import random

    damaged = []
    for seed in range(12):
        blob = encode(photo(400, 300, seed=seed), quality=90)
        rng = random.Random(seed)
        cut = len(blob) // 3
        damaged.append(blob[:cut] + bytes(rng.randrange(256) for _ in range(200)) + blob[cut + 200:])
    pillow_errors = PillowDecoder(spec, draft=False).decode(damaged).errors
    refused = [i for i, e in enumerate(pillow_errors) if e is not None]
    assert refused and all("broken data stream" in pillow_errors[i] for i in refused)
    dali_out = DaliDecoder(spec, num_threads=1).decode([damaged[i] for i in refused])
    assert dali_out.errors == [None] * len(refused) and dali_out.pixels.shape[0] == len(refused)
