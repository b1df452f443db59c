"""HDF5 traces of RSR routing: schema `rsr-trace` v1 (see traces/SCHEMA.md).

Writers (`SamplingWriter`, `TrainingWriter`) stream what a sampler or trainer produces into a
crash-safe SWMR file; `open_trace` reads it back lazily; `join_ranks` merges rank files
through virtual datasets; `estimate_sampling`/`estimate_training` predict sizes up front.
This package depends on numpy and h5py, plus hdf5plugin for the default Blosc compression
(portable traces, `portable=True`, use gzip and read anywhere; `python -m traces convert`).

The names below are imported on first use, so importing `traces.errors` loads neither numpy
nor h5py.
"""

from importlib import import_module

_EXPORTS = {
    "TraceError": "errors",
    "SampleTable": "layout", "SamplingLayout": "layout", "TraceMeta": "layout", "TrainingLayout": "layout",
    "Block": "reader", "Progress": "reader", "TraceReader": "reader", "open_trace": "reader",
    "EXPERT_ABLATED": "schema", "EXPERT_FILL": "schema", "MAX_EXPERTS": "schema", "SCHEMA_NAME": "schema",
    "SCHEMA_VERSION": "schema", "WRITER_VERSION": "schema",
    "SizeEstimate": "size", "estimate_sampling": "size", "estimate_training": "size",
    "join_ranks": "vds",
    "SamplingWriter": "writer", "TrainingWriter": "writer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'traces' has no attribute {name!r}")
