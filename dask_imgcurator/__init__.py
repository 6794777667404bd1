"""dask_imgcurator: curate WebDataset image collections at scale on Dask.

Read shards lazily, embed images with CLIP, score them with LAION heads, filter with plain
boolean masks, and write curated WebDataset shards with Parquet metadata.
"""
from dask_imgcurator.demo_data import make_demo_shards
from dask_imgcurator.io.parquet import read_parquet
from dask_imgcurator.io.reader import read_shard, read_webdataset
from dask_imgcurator.io.shards import ShardError
from dask_imgcurator.io.writer import OutputExistsError, WriteResult, to_webdataset
from dask_imgcurator.models import ClipRef, custom_model, make_tiny_model_dir, register_head
from dask_imgcurator.pipeline import CurationSummary, mark_kept, write_curated
from dask_imgcurator.stages.embed import embed
from dask_imgcurator.stages.filters import FilterSyntaxError, drop_reason, parse_filter, parse_filters
from dask_imgcurator.stages.score import score

__all__ = [
    "read_webdataset",
    "read_shard",
    "read_parquet",
    "to_webdataset",
    "WriteResult",
    "OutputExistsError",
    "ShardError",
    "embed",
    "score",
    "parse_filter",
    "parse_filters",
    "drop_reason",
    "FilterSyntaxError",
    "mark_kept",
    "write_curated",
    "CurationSummary",
    "ClipRef",
    "custom_model",
    "register_head",
    "make_tiny_model_dir",
    "make_demo_shards",
]
__version__ = "0.1.0"
