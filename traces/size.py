"""Predict a trace's file size before recording (for `--max-gb`), writing nothing.

Raw sizes follow from the layout; compressed sizes use ratios measured on realistic data
(SCHEMA.md, "Compression"): expert ids depend on how coherent routing is, so that figure is
a parameter with the measured default; float16 probabilities and latents barely compress.
`upper_bound` assumes no compression at all, for hard limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .layout import SampleTable, SamplingLayout, TrainingLayout
from .schema import datasets

# Measured with traces.synthetic.coherent_routing (8x8-token regions, 5% drift per step,
# 8% noisy tokens, K=8) under Blosc-zstd3-bitshuffle: 0.17 B/record; uniform random ids cost
# ~0.38 (3 of 8 bit planes used).
ROUTING_BYTES_PER_RECORD = 0.17
PORTABLE_ROUTING_BYTES_PER_RECORD = 0.21  # the same data under gzip-4 + shuffle (portable traces)
PROB_RATIO = 0.88        # float16 gate probabilities, Blosc-zstd3-bitshuffle
LATENT_RATIO = 0.97      # float16 activations, Blosc-zstd3-shuffle
IMAGE_RATIO = 0.9        # decoded uint8 images, lossless zstd (content-dependent; noisy content ~1.0)
FIXED_BYTES = 48 << 10   # superblock, object headers, attributes, coordinates
BYTES_PER_CHUNK = 48     # chunk index entry plus Blosc header


@dataclass
class SizeEstimate:
    """Expected bytes per dataset; `total` is their sum, `upper_bound` the uncompressed sum."""

    parts: dict[str, int] = field(default_factory=dict)
    upper_bound: int = 0

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    def __str__(self) -> str:
        rows = [f"  {k:18s} {v / 2**20:10.2f} MiB" for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1])]
        return "\n".join([f"expected {self.total / 2**20:.2f} MiB "
                          f"(uncompressed bound {self.upper_bound / 2**20:.2f} MiB)", *rows])


def _estimate(kind: str, features: set[str], lengths: dict[str, int], ratios: dict[str, float],
              scalars: tuple[str, ...] = ()) -> SizeEstimate:
    """Price every dataset of the schema table the layout turns on, except fixed coordinates
    and per-sample tables (in FIXED_BYTES and `samples`).

    Unfiltered datasets occupy whole allocated chunks; filtered ones their raw bytes times the
    measured ratio; every chunk adds an index entry (and filter header).
    """
    est = SizeEstimate()
    for spec in datasets(kind, features, scalars):
        if spec.role == "table" and spec.chunks is None or spec.role == "coord" and not spec.grows:
            continue
        shape = spec.shape(lengths)
        itemsize = spec.numpy_dtype.itemsize
        chunk = spec.chunk_shape(shape)
        n_chunks = math.prod(-(-n // c) for n, c in zip(shape, chunk))
        allocated = n_chunks * math.prod(chunk) * itemsize
        raw = math.prod(shape) * itemsize
        name = spec.path.lstrip("/")
        if spec.filter == "none":
            stored, est.upper_bound = allocated, est.upper_bound + allocated
        else:
            stored, est.upper_bound = raw * ratios.get(spec.path, 1.0), est.upper_bound + raw
        est.parts[name] = int(stored + n_chunks * BYTES_PER_CHUNK)
    est.parts["metadata"] = FIXED_BYTES
    est.upper_bound += FIXED_BYTES
    return est


def estimate_sampling(layout: SamplingLayout, n_samples: int, samples: SampleTable | None = None,
                      routing_bytes_per_record: float | None = None,
                      image_ratio: float = IMAGE_RATIO, portable: bool = False) -> SizeEstimate:
    """Expected size of a sampling trace holding `n_samples` samples of `layout` (`portable`:
    written with gzip instead of Blosc)."""
    if routing_bytes_per_record is None:
        routing_bytes_per_record = PORTABLE_ROUTING_BYTES_PER_RECORD if portable else ROUTING_BYTES_PER_RECORD
    ratios = {"/routing/expert": routing_bytes_per_record, "/routing/prob": PROB_RATIO,
              "/latents/h": LATENT_RATIO, "/decoded/step": image_ratio, "/decoded/final": image_ratio}
    est = _estimate("sampling", layout.features(), layout.axis_lengths(n_samples), ratios)
    table = 0
    if samples is not None:
        table = sum(len(p.encode()) + 32 for p in samples.prompt)
        table += sum(len(str(x).encode()) + 32 for x in (samples.scene or []))
    est.parts["samples"] = table + 16 * n_samples
    est.upper_bound += table
    return est


def estimate_training(layout: TrainingLayout, n_events: int, n_logs: int = 0,
                      routing_bytes_per_record: float | None = None, portable: bool = False) -> SizeEstimate:
    """Expected size of a training trace with `n_events` routing events and `n_logs` scalar rows."""
    if routing_bytes_per_record is None:
        routing_bytes_per_record = PORTABLE_ROUTING_BYTES_PER_RECORD if portable else ROUTING_BYTES_PER_RECORD
    ratios = {"/routing/expert": routing_bytes_per_record, "/routing/prob": PROB_RATIO}
    return _estimate("training", layout.features(), layout.axis_lengths(n_events, n_logs), ratios,
                     tuple(layout.scalars))
