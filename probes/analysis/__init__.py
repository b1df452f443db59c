"""Probes over a trace, keyed by layer and recursion step.

`analyze(trace)` makes one streaming pass over the trace with `TraceReader.iter_chunks` (one
chunk cell = one (sample, branch, timestep) of a sampling trace, one event of a training
trace) and folds every cell into each probe family of `families.FAMILIES` (load, gate,
information, transitions, spatial, stability, convergence, projections); memory is bounded
by one chunk plus one sample's routing (for the seed / branch comparisons) plus the latent
subsample (`max_latent_points`). The result is the JSON-ready report documented in
`probes/REPORT.md`.

Conventions
-----------
* Expert ids >= K (255 unwritten, 254 ablated by an intervention) are invalid and are left
  out of every statistic; `notes` says how many were seen.
* Timestep bins (`traces.bins.timestep_bins`): sampling traces bin the *recorded* sampler
  steps in sampler order (bin 0 = the noisiest) into `n_bins` equal groups; training traces
  bin the events' timestep values into `n_bins` equal-width bins between their min and max.
* Load uses `/routing/counts` (all tokens, even with a token stride); everything else uses
  the stored expert ids of the stored tokens.
* MI labels: timestep bin, recursion step, position (at most 4x4 regions of the token grid),
  guidance branch, prompt, the prompt attributes the task wrote into `/samples/scene`
  (`scene["attributes"]`, e.g. colour / shape / count / relation), and the class label. A
  label with one value only, or splitting the samples like an earlier one, is skipped.
  Prompt attributes describe the *prompt*, so every branch (also the unconditional one)
  is counted with them; read `branch` MI next to them.
* z-loss needs router logits; traces store probabilities only, so it is null with a note.
"""

from __future__ import annotations

from typing import Any

from traces import TraceReader, open_trace

from .compare import compare_traces
from .families import FAMILIES, LATENT_COLUMNS, Part, ProbeFamily
from .results import jsonable
from .run import REPORT_SCHEMA, REPORT_VERSION, run_pass
from .setup import Options, prompt_attributes


def analyze(trace: TraceReader | str, options: Options | None = None,
            timings: dict[str, float] | None = None, workers: int = 1) -> dict[str, Any]:
    """Every routing / latent probe (not the causal one) over a whole trace.

    Returns the report (see `probes/REPORT.md`). A `timings` dict, if
    given, receives `stream_s` (reading, decompressing and folding every chunk),
    `assemble_s` (statistics from the tables: permutation nulls, expected MI, linear
    probes), `chunks` and `processes` (that folded them). `workers` > 1 folds a sampling trace in that many processes
    (`probes.analysis.parallel`): the same report, float sums to float64 rounding.
    """
    options = options or Options()
    own = not isinstance(trace, TraceReader)
    if own:
        trace = open_trace(trace)
    try:
        return run_pass(trace, options, timings if timings is not None else {}, workers)
    finally:
        if own:
            trace.close()


__all__ = ["FAMILIES", "LATENT_COLUMNS", "REPORT_SCHEMA", "REPORT_VERSION", "Options", "Part", "ProbeFamily",
           "analyze", "compare_traces", "jsonable", "prompt_attributes"]
