"""Recorders: turn the model's hook points into trace files (model -> hooks -> traces).

`SamplingRecorder` samples with hooks on and writes one `rsr-trace` sampling file;
`TrainingRecorder` is a trainer callback that writes a training trace every N steps. Both
live beside the hook points so that the training command and the probes use them alike;
they write only through `traces`, which knows nothing of the model.

What one sampler step costs the recorder: for each selected (layer, step) a hook copies the
selected tokens' expert ids (and, when asked, gate probabilities and a projected latent
subset) to the CPU; after the transformer call the buffers are stacked into the writer's
(B, branch, layer, step, token) block and written as one chunk-aligned write. Counts always
cover every token, so cheap summaries stay exact even with a token stride.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from traces import (
    EXPERT_ABLATED,
    SampleTable,
    SamplingLayout,
    SamplingWriter,
    TraceMeta,
    TrainingLayout,
    TrainingWriter,
)

from .flow import SamplerStep, make_scheduler
from .hooks import HookFn, hook_name
from .install import RSR
from .sample import generate
from .tasks import Task


class RoutingIntervention(Protocol):
    """What a recorder needs of an intervention (probes.interventions.Intervention): which expert
    hook points it replaces, and the hook that does it."""

    def names(self) -> list[str]: ...

    def hook(self, n_experts: int) -> HookFn: ...  # with `changed` (decisions changed) and `counting`

    def to_dict(self) -> dict[str, Any]: ...


ABLATED = EXPERT_ABLATED  # stored id of a token whose adapter an intervention removed (-1 in the model)


@dataclass
class Selection:
    """What a recording stores. None means "all" for layers, steps and timesteps."""

    layers: Sequence[int] | None = None
    steps: Sequence[int] | None = None
    timesteps: Sequence[int] | None = None  # sampler step indices 0..T-1
    token_stride: int = 1
    tokens: Sequence[int] | None = None  # explicit token ids (overrides stride)
    probs: bool = False
    latent_tokens: int = 0  # how many tokens' latents (evenly spaced over the grid); 0 = none
    latent_dim: int | None = None  # project latents to this many dims (random orthonormal); None = full
    decode: bool = False
    branches: Sequence[str] | None = None  # subset of ("cond", "uncond"); None = all that run

    def resolve(self, rsr: RSR, n_tokens: int, n_timesteps: int, guided: bool) -> dict[str, Any]:
        layers = rsr.layer_indices if self.layers is None else list(self.layers)
        missing = [l for l in layers if l not in rsr.layer_indices]
        if missing:
            raise ValueError(f"layers {missing} have no RSR (RSR layers: {rsr.layer_indices})")
        L = rsr.config.steps
        steps = list(range(L)) if self.steps is None else list(self.steps)
        if any(not 0 <= s < L for s in steps):
            raise ValueError(f"recursion steps must lie in 0..{L - 1}, got {steps}")
        ts = list(range(n_timesteps)) if self.timesteps is None else list(self.timesteps)
        if any(not 0 <= t < n_timesteps for t in ts):
            raise ValueError(f"timesteps must lie in 0..{n_timesteps - 1}, got {ts}")
        if self.tokens is not None:
            tokens = list(self.tokens)
            if any(not 0 <= t < n_tokens for t in tokens):
                raise ValueError(f"tokens must lie in 0..{n_tokens - 1}")
        else:
            if self.token_stride < 1:
                raise ValueError("token stride must be at least 1")
            tokens = list(range(0, n_tokens, self.token_stride))
        available = ("cond", "uncond") if guided else ("cond",)
        branches = list(available) if self.branches is None else list(self.branches)
        bad = [b for b in branches if b not in available]
        if bad:
            raise ValueError(f"branches {bad} are not sampled (available: {', '.join(available)})")
        latent_tokens = None
        if self.latent_tokens:
            n = min(self.latent_tokens, n_tokens)
            latent_tokens = np.unique(np.linspace(0, n_tokens - 1, n).round().astype(int)).tolist()
        return dict(layers=layers, steps=steps, timesteps=ts, tokens=tokens, branches=branches,
                    latent_tokens=latent_tokens)


def random_projection(dim: int, out: int, seed: int = 0) -> np.ndarray:
    """(dim, out) matrix with orthonormal columns: distances shrink uniformly, nothing is learned."""
    g = np.random.default_rng(seed)
    q, _ = np.linalg.qr(g.standard_normal((dim, out)))
    return q.astype(np.float32)


class _BackgroundWrites:
    """Runs a writer's calls in order on one background thread, so HDF5 compression and
    flushes overlap the next transformer call (torch releases the GIL while it computes).

    A call that fails re-raises its error at the next `submit` or at `join`. A process killed
    meanwhile loses only queued calls; every call that ran is flushed, as with direct writes.
    """

    def __init__(self) -> None:
        import queue
        import threading

        self._q: "queue.Queue" = queue.Queue(maxsize=4)  # bounded: memory stays a few steps' worth
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args, kw = item
            if self._error is None:
                try:
                    fn(*args, **kw)
                except BaseException as e:  # handed to the caller's thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn, *args, **kw) -> None:
        self._raise()
        self._q.put((fn, args, kw))

    def join(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()


class _Buffers:
    """Per-transformer-call capture of the hooked values, keyed by (layer, step)."""

    def __init__(self) -> None:
        self.expert: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], torch.Tensor] = {}
        self.prob: dict[tuple[int, int], torch.Tensor] = {}
        self.latent: dict[tuple[int, int], torch.Tensor] = {}
        self.active = True  # hooks copy nothing while False (timesteps that are not recorded)

    def clear(self) -> None:
        for d in (self.expert, self.counts, self.prob, self.latent):
            d.clear()


def _expert_to_stored(e: torch.Tensor) -> torch.Tensor:
    return torch.where(e < 0, torch.full_like(e, ABLATED), e).to(torch.uint8)


def _token_picker(tokens: Sequence[int], n_tokens: int):
    """(rows, N, ...) -> the stored tokens; no copy when every token is stored."""
    if list(tokens) == list(range(n_tokens)):
        return lambda t: t
    index = torch.as_tensor(list(tokens))
    return lambda t: t[:, index]


def _all_token_counts(e: torch.Tensor, K: int) -> torch.Tensor:
    """(rows, N) expert ids, -1 = ablated -> (rows, K) int32 counts over every token."""
    counts = torch.zeros(e.shape[0], K, dtype=torch.int32, device=e.device)
    return counts.scatter_add_(1, e.clamp(min=0), (e >= 0).to(torch.int32)).cpu()


class SamplingRecorder:
    """Samples prompts (or labels) with hooks on and writes a sampling trace."""

    def __init__(self, task: Task, transformer: nn.Module, rsr: RSR, selection: Selection,
                 interventions: Sequence[RoutingIntervention] = (), steps: int = 28, guidance: float = 3.0) -> None:
        self.task, self.transformer, self.rsr = task, transformer, rsr
        self.sel, self.interventions = selection, list(interventions)
        self.steps, self.guidance = steps, guidance
        self.K = rsr.config.experts
        C, H, W = task.latent_shape(transformer)
        self.grid = task.token_grid(transformer)
        self.n_tokens = self.grid[0] * self.grid[1]
        self.guided = guidance != 1.0
        self.r = selection.resolve(rsr, self.n_tokens, steps, self.guided)
        self.dim = next(iter(rsr.values())).experts.in_dim
        self.projection = None
        if selection.latent_tokens and selection.latent_dim and selection.latent_dim < self.dim:
            self.projection = random_projection(self.dim, selection.latent_dim)
        self.image_shape = tuple(task.to_images(torch.zeros(1, C, H, W)).shape[1:])
        self._buf = _Buffers()
        self.intervention_hooks: list = []

    # --- layout -----------------------------------------------------------------------------
    def layout(self) -> SamplingLayout:
        sched = make_scheduler(self.task.shift)
        sched.set_timesteps(self.steps)
        ts = self.r["timesteps"]
        r = self.r
        latent_dim = 0
        if r["latent_tokens"] is not None:
            latent_dim = self.projection.shape[1] if self.projection is not None else self.dim
        return SamplingLayout(
            n_experts=self.K, layers=r["layers"], steps=r["steps"], tokens=r["tokens"], timesteps=ts,
            timestep_values=[float(sched.timesteps[i]) for i in ts], sigmas=[float(sched.sigmas[i]) for i in ts],
            branches=tuple(r["branches"]), store_prob=self.sel.probs,
            latent_tokens=r["latent_tokens"], latent_dim=latent_dim, projection=self.projection,
            image_shape=self.image_shape, decode_steps=self.sel.decode, decoded_branches=("guided",),
            counts_scope="all_tokens")

    # --- hooks ------------------------------------------------------------------------------
    def _hooks(self) -> list:
        r, buf = self.r, self._buf
        pick = _token_picker(r["tokens"], self.n_tokens)
        # With every token stored the writer counts them on its own thread; with a subset the
        # hook counts all tokens here, so counts stay exact.
        count_here = len(r["tokens"]) != self.n_tokens
        lat = torch.as_tensor(r["latent_tokens"]) if r["latent_tokens"] is not None else None
        proj = torch.from_numpy(self.projection) if self.projection is not None else None
        K = self.K
        out = []
        for layer in r["layers"]:
            for s in r["steps"]:
                key = (layer, s)

                def on_expert(e, ctx, key=key):
                    if not buf.active:
                        return
                    buf.expert[key] = _expert_to_stored(pick(e)).cpu()  # (2B|B, n_tok)
                    if count_here:
                        buf.counts[key] = _all_token_counts(e, K)  # (2B|B, K)
                out.append((hook_name(layer, "expert", s), on_expert))
                if self.sel.probs:
                    def on_probs(v, ctx, key=key):
                        if buf.active:
                            buf.prob[key] = pick(v).to(torch.float16).cpu()
                    out.append((hook_name(layer, "probs", s), on_probs))
                if lat is not None:
                    def on_latent(h, ctx, key=key):
                        if not buf.active:
                            return
                        h = h[:, lat].float()  # (2B|B, n_lat, D)
                        buf.latent[key] = (h @ proj if proj is not None else h).to(torch.float16).cpu()
                    out.append((hook_name(layer, "latent", s), on_latent))
        return out

    def _stack(self, d: dict, rows: dict[str, slice]) -> np.ndarray:
        """{(layer, step): (rows_all, ...)} -> (B, branch, layer, step, ...)."""
        r = self.r
        per_branch = []
        for b in r["branches"]:
            sl = rows[b]
            per_branch.append(torch.stack([torch.stack([d[(l, s)][sl] for s in r["steps"]], 1)
                                           for l in r["layers"]], 1))  # (B, layer, step, ...)
        return torch.stack(per_branch, 1).numpy()

    # --- decode -----------------------------------------------------------------------------
    def _decode_steps(self, step: SamplerStep) -> np.ndarray:
        """Early-exit x0 images (B, 1, layer, step, H, W, C): layer i finished at step s."""
        r = self.r
        L = self.rsr.config.steps
        out = np.zeros((step.x.shape[0], 1, len(r["layers"]), len(r["steps"]), *self.image_shape), np.uint8)
        for li, layer in enumerate(r["layers"]):
            for si, s in enumerate(r["steps"]):
                if s == L - 1:
                    v = step.v  # exiting at the last step is the normal forward
                else:
                    self.rsr.layer(layer).exit_step = s
                    self._count_interventions(False)  # a decode is not part of the run
                    try:
                        # sampler index -1: this timestep's buffers are stacked already, the hooks copy nothing
                        v = step.denoise(step.x, step.t, -1)
                    finally:
                        self.rsr.layer(layer).exit_step = None
                        self._count_interventions(True)
                out[:, 0, li, si] = self.task.to_images(step.x - step.sigma * v)
        return out

    def _count_interventions(self, on: bool) -> None:
        for h in self.intervention_hooks:
            h.counting = on

    def interventions_applied(self) -> list[dict[str, Any]]:
        """Each intervention's spec with `tokens_changed`: the routing decisions (sample x branch x
        timestep x layer x recursion step x token) it changed in the last `record` run."""
        pairs = zip(self.interventions, self.intervention_hooks)
        return [{**iv.to_dict(), "tokens_changed": h.changed} for iv, h in pairs]

    # --- run --------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, writer: SamplingWriter, items: Sequence, seeds: Sequence[int], batch_size: int = 8,
               progress=None, sample_ids: Sequence[int] | None = None) -> None:
        """Sample `items` (one per seed) batch by batch, writing every selected timestep.

        `sample_ids` are the global ids hooks see in their context (a rank's shard); default 0..n-1.
        """
        ids = torch.as_tensor(list(sample_ids) if sample_ids is not None else range(len(items)))
        # Interventions first: hooks run in order, and the trace must hold the ids the model used.
        self.intervention_hooks = [iv.hook(self.K) for iv in self.interventions]
        hooks = [(iv.names(), h) for iv, h in zip(self.interventions, self.intervention_hooks)] + self._hooks()
        self._bg = _BackgroundWrites()
        try:
            with self.rsr.hooks.hooks(hooks):
                for start in range(0, len(items), batch_size):
                    self._record_batch(writer, items[start:start + batch_size], seeds[start:start + batch_size],
                                       ids[start:start + batch_size], progress)
        finally:
            self._bg.join()
            self.rsr.set_context()

    def _record_batch(self, writer: SamplingWriter, items: Sequence, seeds: Sequence[int], ids: torch.Tensor,
                      progress) -> None:
        buf, B = self._buf, len(items)
        wanted = {t: i for i, t in enumerate(self.r["timesteps"])}  # sampler step -> position in the trace
        rows = {"uncond": slice(0, B), "cond": slice(B, 2 * B)} if self.guided else {"cond": slice(0, B)}
        self._bg.submit(writer.begin_batch, B)
        self.rsr.set_context(sample_ids=torch.cat([ids, ids]) if self.guided else ids,
                             branch=(["uncond"] * B + ["cond"] * B) if self.guided else ["cond"] * B)

        def before_call(i: int, t: torch.Tensor) -> None:
            buf.clear()
            buf.active = i in wanted  # unrecorded timesteps (and early-exit decodes) run with the hooks idle

        def on_step(step: SamplerStep) -> None:
            if step.index in wanted:
                self._write(writer, wanted[step.index], rows, step)
            if progress is not None:
                progress.update(B)

        x = generate(self.task, self.transformer, list(items), list(seeds), self.steps, self.guidance,
                     before=before_call, on_step=on_step)
        self._bg.submit(writer.write_final, self.task.to_images(x))

    def _write(self, writer: SamplingWriter, t_pos: int, rows: dict[str, slice], step: SamplerStep) -> None:
        buf = self._buf
        kw: dict[str, Any] = {"counts": self._stack(buf.counts, rows) if buf.counts else None}
        if self.sel.probs:
            kw["prob"] = self._stack(buf.prob, rows)
        if self.r["latent_tokens"] is not None:
            kw["latents"] = self._stack(buf.latent, rows)
        expert = self._stack(buf.expert, rows)
        if self.sel.decode:
            kw["decoded"] = self._decode_steps(step)
        self._bg.submit(writer.write_timestep, t_pos, expert, **kw)


def sample_table(task: Task, items: Sequence, seeds: Sequence[int],
                 sample_ids: Sequence[int] | None = None) -> SampleTable:
    text = task.conditioning == "text"
    return SampleTable(prompt=[str(i) if text else f"class {i}" for i in items], seed=list(seeds),
                       label=None if text else [int(i) for i in items],
                       scene=[task.describe(i) or "" for i in items],
                       sample_id=None if sample_ids is None else list(sample_ids))


class TrainingRecorder:
    """Trainer callback: every `every` steps, the routing of that step's batch as events.

    Hooks are attached only on recorded steps (`before`), so other steps run with nothing
    attached; losses and balance are logged every step (two floats).
    """

    def __init__(self, path, every: int, task: Task, meta: TraceMeta, token_stride: int = 1,
                 probs: bool = False, overwrite: bool = False) -> None:
        self.path, self.every, self.task, self.meta = path, every, task, meta
        self.token_stride, self.probs, self.overwrite = token_stride, probs, overwrite
        self.writer: TrainingWriter | None = None
        self._handles: list = []
        self._buf = _Buffers()
        self._t: torch.Tensor | None = None

    def _open(self, rsr: RSR, transformer: nn.Module) -> None:
        rows, cols = self.task.token_grid(transformer)
        self.n_tokens = rows * cols
        self.tokens = list(range(0, self.n_tokens, self.token_stride))
        self._pick = _token_picker(self.tokens, self.n_tokens)
        self.layers = rsr.layer_indices
        self.steps = list(range(rsr.config.steps))
        self.writer = TrainingWriter(self.path, TrainingLayout(
            n_experts=rsr.config.experts, layers=self.layers, steps=self.steps, tokens=self.tokens,
            store_prob=self.probs, counts_scope="all_tokens"), self.meta, overwrite=self.overwrite)

    def before(self, stage: str, step: int, transformer: nn.Module, rsr: RSR | None) -> None:
        if rsr is None or step % self.every:
            return
        if self.writer is None:
            self._open(rsr, transformer)
        buf, K = self._buf, rsr.config.experts
        pick = self._pick
        buf.clear()

        def on_expert(e, ctx):
            key = (ctx.layer, ctx.step)
            buf.expert[key] = _expert_to_stored(pick(e.detach())).cpu()
            buf.counts[key] = _all_token_counts(e.detach(), K)
            self._t = ctx.timestep
        hooks = [(hook_name("*", "expert", "*"), on_expert)]
        if self.probs:
            hooks.append((hook_name("*", "probs", "*"), lambda v, ctx: buf.prob.__setitem__(
                (ctx.layer, ctx.step), pick(v.detach()).to(torch.float16).cpu())))
        for names, fn in hooks:
            self._handles += rsr.hooks.add(names, fn)

    def __call__(self, info) -> None:  # after the optimizer step
        if info.rsr is None:
            return
        if self.writer is None:
            self._open(info.rsr, info.transformer)
        self.writer.log(info.step, loss=info.loss, balance=np.nan if info.balance is None else info.balance)
        if not self._handles:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        buf = self._buf

        def stack(d):  # {(layer, step): (B, ...)} -> (B, layer, step, ...)
            return torch.stack([torch.stack([d[(l, s)] for s in self.steps], 1) for l in self.layers], 1).numpy()

        B = buf.expert[(self.layers[0], self.steps[0])].shape[0]
        kw = {"counts": stack(buf.counts)}
        if self.probs:
            kw["prob"] = stack(buf.prob)
        self.writer.write_events(info.step, np.arange(B) + (info.step - 1) * B,
                                 self._t.detach().cpu().numpy().astype(np.float64), stack(buf.expert), **kw)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def abort(self) -> None:
        """After a failed run: close without marking the trace complete."""
        if self.writer is not None:
            self.writer.abort()
