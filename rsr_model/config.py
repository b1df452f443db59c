"""RSR configuration: one dataclass, the paper's ablations as modes, named configurations (`rsr_config(name)`).

The paper's ablations are configurations, not forks (docs/design.md, "Modes"):

    mode            experts  steps  gate
    rsr             K        L      yes      full Recursive Sparse Reasoning
    sft             1        1      no       plain LoRA on to_q/to_k/to_v ("SFT")
    no_recursion    K        1      yes      mixture of LoRA experts, one step
    no_modulation   1        L      no       recursion with a single adapter

`num_experts` and `latent_steps` keep what the user asked for; `experts` and `steps` are what
the mode actually runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from cli_common.errors import UserError
from traces.schema import MAX_EXPERTS

MODES = ("rsr", "sft", "no_recursion", "no_modulation")
ROUTINGS = ("token", "expert_choice")


class ConfigError(UserError):
    """A configuration that cannot be built; the message is one line meant for users."""


@dataclass
class RSRConfig:
    num_experts: int = 4  # K
    latent_steps: int = 3  # L
    rank: int = 8  # r of every LoRA factor
    target_layers: list[int] = field(default_factory=lambda: [2])
    gumbel_tau: float = 5.0  # only shapes the straight-through gradient; the hard choice is categorical
    balance_weight: float = 0.01  # added to the loss only when experts > 3 (paper section 4.1)
    balance_over: str = "step"  # "step": every recursion step balanced; "recursion": f, P pooled over steps
    mode: str = "rsr"
    gate_hidden: int = 64
    lora_alpha: float | None = None  # None: alpha = rank, so the LoRA scale is 1
    lora_dropout: float = 0.0
    # "token": each token draws its expert from the gate (the paper's hard Gumbel; argmax at sampling);
    # "expert_choice": experts compete for tokens (paper Table 4's differentiable top-k at temperature
    # `ec_temperature`, read as expert choice: docs/design.md A7 reading b), at training and sampling alike
    routing: str = "token"
    ec_temperature: float = 0.1

    def __post_init__(self) -> None:
        self.target_layers = [int(i) for i in self.target_layers]
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("num_experts", "latent_steps", "rank", "gate_hidden"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_experts > MAX_EXPERTS:
            raise ConfigError(f"num_experts must be at most {MAX_EXPERTS} (traces store expert ids as uint8, "
                              f"with two marker values)")
        if not self.target_layers:
            raise ConfigError("target_layers must name at least one block")
        if any(i < 0 for i in self.target_layers):
            raise ConfigError(f"target_layers must be non-negative, got {self.target_layers}")
        if len(set(self.target_layers)) != len(self.target_layers):
            raise ConfigError(f"target_layers has duplicates: {self.target_layers}")
        if self.balance_over not in ("step", "recursion"):
            raise ConfigError(f"balance_over must be 'step' or 'recursion', got {self.balance_over!r}")
        if self.gumbel_tau <= 0:
            raise ConfigError(f"gumbel_tau must be positive, got {self.gumbel_tau}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.ec_temperature <= 0:
            raise ConfigError(f"ec_temperature must be positive, got {self.ec_temperature}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def experts(self) -> int:
        """Experts the mode runs."""
        return self.num_experts if self.mode in ("rsr", "no_recursion") else 1

    @property
    def steps(self) -> int:
        """Latent steps the mode runs."""
        return self.latent_steps if self.mode in ("rsr", "no_modulation") else 1

    @property
    def has_gate(self) -> bool:
        return self.experts > 1

    @property
    def scaling(self) -> float:
        alpha = self.rank if self.lora_alpha is None else self.lora_alpha
        return float(alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RSRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown RSR config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "RSRConfig":
        return dataclasses.replace(self, **changes)


# Named RSR configurations, as tiny factory functions (DiT / nanoGPT style).
def tiny(**kw: Any) -> RSRConfig:
    """For tests and the CPU demo: the middle block of the tiny SD3 backbone."""
    return RSRConfig(**{**dict(num_experts=4, latent_steps=3, rank=8, target_layers=[2], gate_hidden=64), **kw})


def paper_sd3_medium_middle(**kw: Any) -> RSRConfig:
    """Paper Table 4: SD3-medium (24 blocks), looped layer 12, rank 128, tau 5."""
    return RSRConfig(**{**dict(num_experts=5, latent_steps=5, rank=128, target_layers=[12], gate_hidden=256), **kw})


def paper_sd3_medium_multi(**kw: Any) -> RSRConfig:
    """Paper Table 4: SD3-medium, looped layers 4, 8, 12."""
    paper = dict(num_experts=5, latent_steps=5, rank=128, target_layers=[4, 8, 12], gate_hidden=256)
    return RSRConfig(**{**paper, **kw})


def paper_dit_xl(**kw: Any) -> RSRConfig:
    """Paper section 4.2: DiT-XL (24 blocks), self-attention of the middle block."""
    return RSRConfig(**{**dict(num_experts=5, latent_steps=5, rank=128, target_layers=[12], gate_hidden=256), **kw})


RSR_CONFIGS = {
    "tiny": tiny,
    "paper_sd3_medium_middle": paper_sd3_medium_middle,
    "paper_sd3_medium_multi": paper_sd3_medium_multi,
    "paper_dit_xl": paper_dit_xl,
}


def rsr_config(name: str, **kw: Any) -> RSRConfig:
    if name not in RSR_CONFIGS:
        raise ConfigError(f"unknown RSR configuration {name!r}; choose from {', '.join(RSR_CONFIGS)}")
    return RSR_CONFIGS[name](**kw)
