"""Probes: recording traces from the model's hook points, and statistics of expert specialization.

    python -m probes.record --ckpt sd3_rsr.pt --prompts FILE_OR_TEXT --out run.h5   # record
    python -m probes.report run.h5 --json report.json --figures figs/               # analyse
"""

from .analysis import Options, analyze, compare_traces
from .causal import causal_effect, expert_effects
from .derived import derive, load_derived

__all__ = ["Options", "analyze", "compare_traces", "causal_effect", "expert_effects", "derive", "load_derived"]
