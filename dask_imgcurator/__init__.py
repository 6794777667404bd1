"""dask_imgcurator: curate WebDataset image collections at scale on Dask."""
from dask_imgcurator.demo_data import make_demo_shards
from dask_imgcurator.io.reader import read_shard, read_webdataset
from dask_imgcurator.io.writer import OutputExistsError, WriteResult, to_webdataset

__all__ = [
    "read_webdataset",
    "read_shard",
    "to_webdataset",
    "WriteResult",
    "OutputExistsError",
    "make_demo_shards",
]
__version__ = "0.1.0"
