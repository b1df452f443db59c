"""Several training processes (`accelerate launch --multi_gpu`, `torchrun`): what the ranks must
agree on, and how one rank's end is told to the others.

* `--check-replicas` prints, at the end of each stage, one line with a digest of every rank's
  weights and of the batches it drew: data parallelism is right when the weight digests are one
  and the batch digests differ. A team starting on a cluster runs it once; it costs one gather.
* A rank whose peer stopped (Ctrl-C, out of memory, a killed node) sees the collective fail;
  `peer_stopped` recognises that failure so the command ends with one line, not a traceback.

Launch two CPU processes with `accelerate launch --multi_gpu --num_processes 2 -m rsr_model train`
(on a machine without CUDA, accelerate falls back to gloo). `accelerate launch --cpu
--num_processes 2` starts ONE process unless an MPI hostfile is given (accelerate 1.x).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from cli_common.command import env_int


def launcher_rank() -> int:
    """This process's global rank as the launcher (torchrun, accelerate launch) set it; 0 alone."""
    return env_int("RANK", 0)


def weights_digest(module: nn.Module) -> str:
    """sha256 (16 hex) of every tensor of `module`'s state dict, in name order."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class BatchDigest:
    """Running sha256 of the batches one rank drew in a stage."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, x: torch.Tensor) -> None:
        self._h.update(x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def replica_line(accelerator, stage: str, module: nn.Module, batches: BatchDigest) -> tuple[str, bool]:
    """(the line the main process prints, whether every rank holds the same weights)."""
    from accelerate.utils import gather_object

    mine = [(accelerator.process_index, weights_digest(module), batches.hexdigest())]
    ranks = sorted(gather_object(mine)) if accelerator.num_processes > 1 else mine
    same = len({w for _, w, _ in ranks}) == 1
    parts = " ".join(f"rank{r}=weights:{w},batches:{b}" for r, w, b in ranks)
    verdict = "identical weights" if same else "WEIGHTS DIFFER"
    return f"replicas: stage {stage}: {len(ranks)} rank(s), {verdict}; {parts}", same


def peer_stopped(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank went away (gloo / NCCL)."""
    if not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted", "DistBackendError", "recvBytes",
                                   "Socket Timeout", "Timed out waiting"))
