"""Recursive Sparse Reasoning (RSR): a recursive mixture of LoRA experts inside diffusers attention.

The names below are imported on first use, so a command that needs only `cli_common` (the
dashboard, the trace tools) does not pay for importing torch and diffusers.
"""

from importlib import import_module

_EXPORTS = {
    "MODES": "config", "RSR_CONFIGS": "config", "ConfigError": "config", "RSRConfig": "config", "rsr_config": "config",
    "HOOK_POINTS": "hooks", "HookContext": "hooks", "HookPoint": "hooks", "HookRegistry": "hooks", "hook_name": "hooks",
    "RSR": "install", "get_rsr": "install", "install_rsr": "install", "load_rsr": "install",
    "read_rsr_file": "install", "remove_rsr": "install",
    "RSRAttnProcessor": "layer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'rsr_model' has no attribute {name!r}")
