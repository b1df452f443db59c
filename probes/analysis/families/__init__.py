"""The probe families, in report order. A new probe is a `ProbeFamily` subclass in its own
module and one entry in `FAMILIES` (docs/probes.md walks through an example)."""

from .base import Part, ProbeFamily
from .convergence import ConvergenceFamily
from .expert_change import ExpertChangeFamily
from .gate import GateFamily
from .information import InformationFamily
from .load import LoadFamily
from .projections import LATENT_COLUMNS, ProjectionFamily
from .spatial import SpatialFamily
from .stability import StabilityFamily
from .training_curves import TrainingCurvesFamily
from .transitions import TransitionFamily

FAMILIES: list[type[ProbeFamily]] = [
    LoadFamily,
    GateFamily,
    InformationFamily,
    TransitionFamily,
    SpatialFamily,
    StabilityFamily,
    ExpertChangeFamily,
    ConvergenceFamily,
    ProjectionFamily,
    TrainingCurvesFamily,
]

__all__ = ["FAMILIES", "LATENT_COLUMNS", "Part", "ProbeFamily"] + [f.__name__ for f in FAMILIES]
