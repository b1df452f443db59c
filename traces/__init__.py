"""HDF5 traces of RSR routing: schema `rsr-trace` v1 (see traces/SCHEMA.md).

Writers (`SamplingWriter`, `TrainingWriter`) stream what a sampler or trainer produces into a
crash-safe SWMR file; `open_trace` reads it back lazily; `join_ranks` merges rank files
through virtual datasets; `estimate_sampling`/`estimate_training` predict sizes up front.
This package depends on numpy and h5py, plus hdf5plugin for the default Blosc compression
(portable traces, `portable=True`, use gzip and read anywhere; `python -m traces convert`).
"""

from .errors import TraceError
from .layout import SampleTable, SamplingLayout, TraceMeta, TrainingLayout
from .reader import Block, Progress, TraceReader, open_trace
from .schema import EXPERT_ABLATED, EXPERT_FILL, MAX_EXPERTS, SCHEMA_NAME, SCHEMA_VERSION, WRITER_VERSION
from .size import SizeEstimate, estimate_sampling, estimate_training
from .vds import join_ranks
from .writer import SamplingWriter, TrainingWriter

__all__ = [
    "TraceError", "SampleTable", "SamplingLayout", "TrainingLayout", "TraceMeta",
    "SamplingWriter", "TrainingWriter", "open_trace", "TraceReader", "Block", "Progress",
    "join_ranks", "estimate_sampling", "estimate_training", "SizeEstimate",
    "SCHEMA_NAME", "SCHEMA_VERSION", "WRITER_VERSION", "EXPERT_FILL", "EXPERT_ABLATED", "MAX_EXPERTS",
]
