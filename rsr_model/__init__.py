"""Recursive Sparse Reasoning (RSR): a recursive mixture of LoRA experts inside diffusers attention."""

from .config import MODES, PRESETS, ConfigError, RSRConfig, preset
from .hooks import HookContext, HookPoint, HookRegistry
from .install import RSR, get_rsr, install_rsr, load_rsr, read_rsr_file, remove_rsr
from .layer import HOOK_POINTS, RSRAttnProcessor

__all__ = ["MODES", "PRESETS", "ConfigError", "RSRConfig", "preset", "HookContext", "HookPoint", "HookRegistry",
           "RSR", "get_rsr", "install_rsr", "load_rsr", "read_rsr_file", "remove_rsr", "HOOK_POINTS",
           "RSRAttnProcessor"]
