"""Recursive Sparse Reasoning (RSR): a recursive mixture of LoRA experts inside diffusers attention."""

from .config import MODES, RSR_CONFIGS, ConfigError, RSRConfig, rsr_config
from .hooks import HOOK_POINTS, HookContext, HookPoint, HookRegistry, hook_name
from .install import RSR, get_rsr, install_rsr, load_rsr, read_rsr_file, remove_rsr
from .layer import RSRAttnProcessor

__all__ = ["MODES", "RSR_CONFIGS", "ConfigError", "RSRConfig", "rsr_config", "HookContext", "HookPoint", "HookRegistry",
           "RSR", "get_rsr", "install_rsr", "load_rsr", "read_rsr_file", "remove_rsr", "HOOK_POINTS", "hook_name",
           "RSRAttnProcessor"]
