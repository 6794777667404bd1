"""A shard of very large images stays within a worker's memory (batches bounded by pixels, not count)."""
import io
import resource

import numpy as np
import pytest
from PIL import Image

import dask_imgcurator as ic
from tests.conftest import write_tar

pytestmark = pytest.mark.slow

SIDE = (6928, 4618)  # 32 MP: 96 MB once decoded to RGB


def big_jpeg(seed: int) -> bytes:
    small = np.random.default_rng(seed).integers(0, 255, (46, 69, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(SIDE, Image.BILINEAR).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_large_images_on_a_memory_limited_worker(tmp_path):
    pytest.importorskip("nvidia.dali")
    from distributed import Client, LocalCluster

    n = 12  # 1.15 GB of decoded pixels if decoded as one batch
    write_tar(tmp_path / "big.tar", [(f"big{i:02d}.jpg", big_jpeg(i)) for i in range(n)])
    ref = ic.make_tiny_model_dir(tmp_path / "models")
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="2.5GiB", processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        ddf = ic.embed(ic.read_webdataset(str(tmp_path / "big.tar")), ref, decoder="dali", batch_size=32)
        client.run(lambda: __import__("dask_imgcurator.models").models.load_clip(ref))  # warm: model + imports
        client.submit(lambda: None).result()
        before = next(iter(client.run(peak_rss_mb).values()))
        df = ddf.compute()
        after = next(iter(client.run(peak_rss_mb).values()))
        assert len(cluster.workers) == 1
    assert df["error"].isna().all() and (df["width"] == SIDE[0]).all()
    # DALI runs hold at most 128 MP (4 of these images) at once, not all 12.
    assert after - before < 900, f"peak RSS grew by {after - before:.0f} MB"
