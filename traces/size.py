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
from .schema import chunk_shape

# Measured with traces.synthetic.coherent_routing (8x8-token regions, 5% drift per step,
# 8% noisy tokens, K=8) under Blosc-zstd3-bitshuffle: 0.17 B/record; uniform random ids cost
# ~0.38 (3 of 8 bit planes used).
ROUTING_BYTES_PER_RECORD = 0.17
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


def _chunks(shape: tuple[int, ...], itemsize: int, n_outer: int) -> int:
    c = chunk_shape(shape, itemsize, n_outer)
    return math.prod(-(-s // k) for s, k in zip(shape, c))


def estimate_sampling(layout: SamplingLayout, n_samples: int, samples: SampleTable | None = None,
                      routing_bytes_per_record: float = ROUTING_BYTES_PER_RECORD,
                      image_ratio: float = IMAGE_RATIO) -> SizeEstimate:
    """Expected size of a sampling trace holding `n_samples` samples of `layout`."""
    nb, nt, nl, ns, nn = layout.cell_shape()
    k = layout.n_experts
    s = n_samples
    est = SizeEstimate()
    raw = 0

    def add(name: str, shape: tuple[int, ...], itemsize: int, ratio: float, n_outer: int) -> None:
        nonlocal raw
        nbytes = math.prod(shape) * itemsize
        raw += nbytes
        est.parts[name] = int(nbytes * ratio + _chunks(shape, itemsize, n_outer) * BYTES_PER_CHUNK)

    records = s * nb * nt * nl * ns * nn
    raw += records
    est.parts["routing/expert"] = int(records * routing_bytes_per_record
                                      + _chunks((s, nb, nt, nl, ns, nn), 1, 3) * BYTES_PER_CHUNK)
    add("routing/counts", (s, nb, nt, nl, ns, k), 4, 1.0, 1)
    if layout.store_prob:
        add("routing/prob", (s, nb, nt, nl, ns, nn, k), 2, PROB_RATIO, 3)
    lt = layout.latent_token_ids
    if lt is not None:
        add("latents/h", (s, nb, nt, nl, ns, len(lt), layout.latent_dim), 2, LATENT_RATIO, 3)
        if layout.projection is not None:
            add("latents/projection", tuple(layout.projection.shape), 4, 1.0, 0)
    if layout.image_shape is not None:
        if layout.decode_steps:
            add("decoded/step", (s, len(layout.decoded_branches), nt, nl, ns, *layout.image_shape), 1,
                image_ratio, 3)
        add("decoded/final", (s, *layout.image_shape), 1, image_ratio, 1)
    padded = -(-s // 256) * 256
    est.parts["progress"] = padded * (nt + 1)
    table = 0
    if samples is not None:
        table = sum(len(p.encode()) + 32 for p in samples.prompt)
        table += sum(len(str(x).encode()) + 32 for x in (samples.scene or []))
    est.parts["samples"] = table + 16 * s
    est.parts["metadata"] = FIXED_BYTES
    est.upper_bound = raw + table + FIXED_BYTES + est.parts["progress"]
    return est


def estimate_training(layout: TrainingLayout, n_events: int, n_logs: int = 0,
                      routing_bytes_per_record: float = ROUTING_BYTES_PER_RECORD) -> SizeEstimate:
    """Expected size of a training trace with `n_events` routing events and `n_logs` scalar rows."""
    nl, ns, nn, k = len(layout.layer_ids), len(layout.step_ids), len(layout.token_ids), layout.n_experts
    est = SizeEstimate()
    records = n_events * nl * ns * nn
    est.parts["routing/expert"] = int(records * routing_bytes_per_record + n_events * BYTES_PER_CHUNK)
    est.parts["routing/counts"] = -(-n_events // 64) * 64 * nl * ns * k * 4
    if layout.store_prob:
        est.parts["routing/prob"] = int(records * k * 2 * PROB_RATIO)
    est.parts["events"] = -(-n_events // 4096) * 4096 * 28
    est.parts["train"] = -(-n_logs // 4096) * 4096 * (8 + 4 * len(layout.scalars))
    est.parts["metadata"] = FIXED_BYTES
    est.upper_bound = records * (1 + 2 * k * layout.store_prob) + sum(
        v for n, v in est.parts.items() if not n.startswith("routing/expert") and n != "routing/prob")
    return est
