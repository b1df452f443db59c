"""Install RSR into a diffusers transformer, remove it, save and load its weights.

Only diffusers' own extension points are used: `Attention.set_processor` puts an
`RSRAttnProcessor` on each target layer, and a forward hook on the conditioning module
(`time_text_embed` in SD3, each block's `norm1.emb` in DiT) hands c and the timestep to the
processors. The processors are nn.Modules, so they register under the attention module
(`...attn.processor.*`) and move, train and wrap (accelerate, DDP) with the transformer.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .arch import ARCHITECTURES, ArchSpec
from .config import ConfigError, RSRConfig
from .hooks import HookRegistry
from .layer import RSRAttnProcessor, RunState

_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, RSR]" = weakref.WeakKeyDictionary()


class RSR(nn.ModuleDict):
    """The RSR layers of one installed model, keyed by block index (as strings), plus its hooks.

    `state_dict()` holds exactly the RSR weights (keys `"{block}.experts.A"`, ...).
    """

    def __init__(self, config: RSRConfig, layers: dict[str, RSRAttnProcessor], hooks: HookRegistry,
                 state: RunState) -> None:
        super().__init__(layers)
        self.config, self.hooks, self.state = config, hooks, state
        self._restore: list = []  # (attention module, original processor)
        self._handles: list = []  # torch forward-hook handles on conditioning modules

    @property
    def layer_indices(self) -> list[int]:
        """Block indices that carry an RSR layer, ascending."""
        return sorted(int(k) for k in self.keys())

    def layer(self, index: int) -> RSRAttnProcessor:
        """The RSR layer on block `index`."""
        if str(index) not in self:
            raise KeyError(f"block {index} has no RSR layer (RSR layers: {self.layer_indices})")
        return self[str(index)]

    def balance_loss(self) -> torch.Tensor | None:
        """Mean balance loss K*sum f P of the last training forward over RSR layers (None if no gate)."""
        losses = [l.last_balance for l in self.values() if l.last_balance is not None]
        return torch.stack(losses).mean() if losses else None

    def set_context(self, sample_ids: torch.Tensor | None = None, train_step: int | None = None, branch=None) -> None:
        """Context handed to hooks with every call (the diffusion timestep is captured automatically)."""
        self.state.sample_ids, self.state.train_step, self.state.branch = sample_ids, train_step, branch

    def set_exit_step(self, step: int | None) -> None:
        """Finish every RSR layer at recursion step `step` (early-exit decode); None restores L."""
        for layer in self.values():
            layer.exit_step = step

    def save(self, path: str | Path) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"rsr_config": self.config.to_json(), "format": "rsr-weights-1"})


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def arch_of(transformer: nn.Module) -> ArchSpec:
    name = type(transformer).__name__
    if name not in ARCHITECTURES:
        raise ConfigError(f"RSR supports {', '.join(ARCHITECTURES)}; got {name}")
    return ARCHITECTURES[name]


def install_rsr(transformer: nn.Module, config: RSRConfig, freeze_base: bool = True) -> RSR:
    """Put RSR on `config.target_layers` of an SD3 or DiT transformer; returns the RSR modules."""
    if transformer in _INSTALLED:
        raise ConfigError("RSR is already installed on this transformer; call remove_rsr first")
    spec = arch_of(transformer)
    blocks = _get(transformer, spec.blocks)
    bad = [i for i in config.target_layers if i >= len(blocks)]
    if bad:
        raise ConfigError(f"target layer(s) {bad} beyond the model's depth "
                          f"({len(blocks)} blocks: 0..{len(blocks) - 1})")
    if freeze_base:
        transformer.requires_grad_(False)
    ref = next(transformer.parameters())
    hooks, state, layers, restore, handles = HookRegistry(), RunState(), {}, [], []
    for i in sorted(config.target_layers):
        attn = _get(blocks[i], spec.attention)
        dim = attn.to_q.in_features
        if attn.to_q.out_features != dim:
            raise ConfigError(f"block {i}: RSR needs attention inner dim == width, "
                              f"got {attn.to_q.out_features} != {dim}")
        layer = RSRAttnProcessor(config, i, dim, cond_dim=dim, registry=hooks, state=state).to(ref.device, ref.dtype)
        layer.train(transformer.training)  # a new module is in train mode; follow the model's mode
        restore.append((attn, attn.get_processor()))
        attn.set_processor(layer)
        layers[str(i)] = layer
    # Conditioning: one module shared by all layers (SD3) or one per block (DiT).
    if spec.cond.startswith("{block}."):
        for i, layer in layers.items():
            handles.append(_get(blocks[int(i)], spec.cond[len("{block}."):]).register_forward_hook(_cond_hook([layer])))
    else:
        handles.append(_get(transformer, spec.cond).register_forward_hook(_cond_hook(list(layers.values()))))
    rsr = RSR(config, layers, hooks, state)
    rsr._restore, rsr._handles = restore, handles
    rsr.requires_grad_(True)
    _INSTALLED[transformer] = rsr
    return rsr


def _cond_hook(layers: list[RSRAttnProcessor]):
    def hook(module, args, output):
        t = args[0] if args else None
        for layer in layers:
            layer.cond, layer.timestep = output, t  # (B, Dc), (B,)
    return hook


def get_rsr(transformer: nn.Module) -> RSR | None:
    return _INSTALLED.get(transformer)


def remove_rsr(transformer: nn.Module) -> RSR:
    """Restore the original processors and drop the conditioning hooks; returns the removed RSR."""
    rsr = _INSTALLED.pop(transformer, None)
    if rsr is None:
        raise ConfigError("RSR is not installed on this transformer")
    for attn, proc in rsr._restore:
        attn.set_processor(proc)
    for h in rsr._handles:
        h.remove()
    rsr.hooks.clear()
    return rsr


def read_rsr_file(path: str | Path) -> tuple[RSRConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a file written by `RSR.save`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "rsr_config" not in meta:
        raise ConfigError(f"{path}: not an RSR weights file (no rsr_config metadata)")
    return RSRConfig.from_dict(json.loads(meta["rsr_config"])), load_file(str(path))


def load_rsr(transformer: nn.Module, path: str | Path) -> RSR:
    """Install RSR from a saved file (config from its metadata) and load the weights strictly."""
    config, tensors = read_rsr_file(path)
    rsr = get_rsr(transformer) or install_rsr(transformer, config)
    rsr.load_state_dict(tensors, strict=True)
    return rsr
