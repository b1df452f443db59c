"""Probes: recording traces from the model's hook points, and statistics of expert specialization.

    python -m probes.record --ckpt sd3_rsr.pt --prompts FILE_OR_TEXT --out run.h5   # record
    python -m probes.report run.h5 --json report.json --figures figs/               # analyse
    python -m probes.causal --ckpt sd3_rsr.pt --prompts "..." --ablate-expert 1     # intervene
    python -m probes.routing_value --ckpt sd3_rsr.pt --json rv.json                  # does routing matter?

The names below are imported on first use, so `python -m probes.<command>` loads only what
that command needs.
"""

from importlib import import_module

_EXPORTS = {
    "Options": "analysis", "analyze": "analysis", "compare_traces": "analysis",
    "causal_effect": "causal", "expert_effects": "causal",
    "derive": "projections", "load_derived": "projections",
    "held_out_batches": "routing_value",  # (the function routing_value shares its module's name: import it from there)
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
