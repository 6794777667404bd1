"""The cuDF dataframe backend (GPU machines only)."""
import dask
import pytest

import dask_imgcurator as ic

pytestmark = pytest.mark.gpu


def test_read_filter_write_on_cudf_partitions(shard_dir, tmp_path):
    cudf = pytest.importorskip("cudf")
    pytest.importorskip("dask_cudf")
    with dask.config.set({"dataframe.backend": "cudf"}):
        ddf = ic.read_webdataset(str(shard_dir))
        assert isinstance(ddf._meta, cudf.DataFrame)
        part = ddf.partitions[0].compute()
        assert isinstance(part, cudf.DataFrame) and len(part) == 5
        kept = ddf[ddf.key.str.endswith("2")]
        result = ic.to_webdataset(kept, str(tmp_path / "out"), samples_per_shard=2)
    assert result.samples == 3
    pandas_keys = ic.read_webdataset(str(tmp_path / "out")).compute()["key"].tolist()
    assert pandas_keys == ["s0-0002", "s1-0002", "s2-0002"]
