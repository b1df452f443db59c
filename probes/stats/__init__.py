"""Statistics of expert specialization and latent recursion, on numpy arrays and chunk streams.

Modules (each holds the closed-form functions and the streaming accumulators
for one family of probes). Every accumulator is a :class:`.running.Stat`:
``update(chunk...)``, ``merge(other)``, ``result()``, ``state_dict()`` /
``load_state_dict()``, and keeps only fixed-size tables, so memory is bounded by
the chunk size:

* :mod:`.running`      -- grouped counting / summing primitives (``np.bincount`` on combined keys)
* :mod:`.routing`      -- load share, utilisation, dead experts, CV, MaxVio, load entropy,
                          router confidence, balance and z-loss monitors, sampling disagreement
* :mod:`.information`  -- MI(expert; label) with Miller-Madow, permutation-null and AMI, soft MI, lift
* :mod:`.transitions`  -- recursion-step transition matrices, persistence, conditional entropy
* :mod:`.spatial`      -- same-expert share of 4-neighbour patch pairs vs chance
* :mod:`.stability`    -- agreement / Cohen's kappa between two routings
* :mod:`.dynamics`     -- latent convergence across recursion steps, fixed point / orbit / drift
* :mod:`.decoding`     -- cross-validated linear-probe decodability vs shuffled labels
* :mod:`.projection`   -- PCA and UMAP with recorded parameters
* :mod:`.effects`      -- effect summaries of interventions
"""

from .decoding import ProbeResult, linear_probe
from .dynamics import (
    TRAJECTORY_LABELS,
    ConvergenceAccumulator,
    ConvergenceMetrics,
    ConvergenceSummary,
    classify_trajectories,
    convergence_metrics,
    log_slope_rho,
)
from .effects import EffectAccumulator, EffectSummary, effect_summary
from .information import (
    ContingencyAccumulator,
    MIResult,
    conditional_entropy,
    expected_mutual_information,
    lift_table,
    mi_summary,
    miller_madow_mi,
    mutual_information,
    sample_null_tables,
    soft_mutual_information,
)
from .projection import Projection, pca, umap_embedding
from .routing import (
    GateAccumulator,
    GateStats,
    LoadAccumulator,
    LoadStats,
    balance_monitor,
    counts_from_ids,
    gate_entropy,
    load_stats,
    sampling_disagreement,
    softmax,
    top1_margin,
    z_loss,
)
from .running import GroupedCounts, GroupedSums, Stat, entropy
from .spatial import SpatialCoherenceAccumulator, SpatialStats, neighbour_agreement
from .stability import (
    AgreementAccumulator,
    AgreementCounts,
    AgreementStats,
    agreement_from_counts,
    agreement_stats,
    agreement_vs_chance,
    routing_agreement,
)
from .transitions import TransitionAccumulator, TransitionStats, transition_stats

# listed, not computed: a linter (and a reader) sees what the package exports
__all__ = [
    "AgreementAccumulator",
    "AgreementCounts",
    "AgreementStats",
    "ContingencyAccumulator",
    "ConvergenceAccumulator",
    "ConvergenceMetrics",
    "ConvergenceSummary",
    "EffectAccumulator",
    "EffectSummary",
    "GateAccumulator",
    "GateStats",
    "GroupedCounts",
    "GroupedSums",
    "LoadAccumulator",
    "LoadStats",
    "MIResult",
    "ProbeResult",
    "Projection",
    "SpatialCoherenceAccumulator",
    "SpatialStats",
    "Stat",
    "TRAJECTORY_LABELS",
    "TransitionAccumulator",
    "TransitionStats",
    "agreement_from_counts",
    "agreement_stats",
    "agreement_vs_chance",
    "balance_monitor",
    "classify_trajectories",
    "conditional_entropy",
    "convergence_metrics",
    "counts_from_ids",
    "effect_summary",
    "entropy",
    "expected_mutual_information",
    "gate_entropy",
    "lift_table",
    "linear_probe",
    "load_stats",
    "log_slope_rho",
    "mi_summary",
    "miller_madow_mi",
    "mutual_information",
    "neighbour_agreement",
    "pca",
    "routing_agreement",
    "sample_null_tables",
    "sampling_disagreement",
    "soft_mutual_information",
    "softmax",
    "top1_margin",
    "transition_stats",
    "umap_embedding",
    "z_loss",
]
