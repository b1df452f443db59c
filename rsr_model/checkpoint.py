"""Checkpoints: everything needed to rebuild a model without the command line that made it.

One `torch.save` dict (loaded with `weights_only=True`, so opening a checkpoint runs no code):

    format, format_version       "rsr-checkpoint", 1
    toolkit_version              the thinking-pixel version that wrote the file ("0+unknown" from an
                                 uninstalled source tree; absent from checkpoints written before it)
    preset, stage                training preset name; "base" | "rsr" (the stage in progress or done)
    backbone                     {"class": diffusers class name, "config": its config dict}
    base_state                   the backbone's weights when they were trained here (tiny, dit-digits),
                                 else None and `pretrained` names the folder they come from (sd3)
    rsr_config, rsr_state        RSR config dict and weights (None before the RSR stage); with an
                                 RSR-stage EMA, rsr_state holds the averaged weights and
                                 rsr_train_state the raw ones a resume continues from
    mode                         the ablation mode ("rsr", "sft", "no_recursion", "no_modulation")
    text_encoder                 identity of the frozen text encoder (None for class-conditioned)
    optimizer, step, stage_steps optimizer state and progress, for --resume
    rng                          torch/numpy generator states at the save
    args, losses                 the training arguments and the loss log

Written atomically: a temporary file in the same folder, fsync, then rename, so a run killed
at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cli_common.errors import UserError
from cli_common.version import toolkit_version

FORMAT, FORMAT_VERSION = "rsr-checkpoint", 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message is one line meant for users."""


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise in memory first: torch.save reports a failed file write (a full disk) as a bare
    # RuntimeError, while a plain write raises an OSError that names the cause.
    data = io.BytesIO()
    # The version is the writer's, also when `ckpt` came from an older file (a resume re-saves it).
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **ckpt, "toolkit_version": toolkit_version()},
               data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or not a torch file: "
                              f"{type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an RSR checkpoint (no '{FORMAT}' format marker)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('format_version')} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
    return ckpt
