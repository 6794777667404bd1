"""read_parquet: file versions identify the frame, and a file replaced before it is read is refused."""
import os

import pandas as pd
import pytest

import dask_imgcurator as ic
from dask_imgcurator.io.sources import input_files


def _write(path, keys, stamp=None):
    pd.DataFrame({"key": keys, "aesthetic_score": [5.0] * len(keys)}).to_parquet(path)
    if stamp is not None:
        os.utime(path, (stamp, stamp))


def test_metadata_rewritten_at_the_same_paths_is_another_run(tmp_path):
    """Re-filtering earlier metadata after it was regenerated must not return the old output."""
    meta = tmp_path / "meta"
    meta.mkdir()
    _write(meta / "part-00000.parquet", ["a", "b"])
    first = ic.read_parquet(meta)
    assert list(input_files(first)) == [str(meta / "part-00000.parquet")]
    stamp = (meta / "part-00000.parquet").stat().st_mtime + 5
    _write(meta / "part-00000.parquet", ["c", "d"], stamp)
    again = ic.read_parquet(meta)
    assert first.__dask_tokenize__() != again.__dask_tokenize__()
    assert again.compute()["key"].tolist() == ["c", "d"]
    with pytest.raises(ic.ShardError, match=r"part-00000\.parquet changed while this run was going"):
        first.compute()


def test_an_existing_path_with_glob_characters_is_read_literally(tmp_path):
    folder = tmp_path / "run[1]"
    folder.mkdir()
    pd.DataFrame({"key": ["a", "b"]}).to_parquet(folder / "00000.parquet")
    assert list(ic.read_parquet(str(folder / "00000.parquet")).compute()["key"]) == ["a", "b"]
    assert list(ic.read_parquet(str(folder)).compute()["key"]) == ["a", "b"]
