"""Record a sampling trace: `python -m probes.record --ckpt sd3_rsr.pt --prompts FILE_OR_TEXT --out run.h5`.

Samples N images per prompt (or class label) with the RSR hook points on and writes an
`rsr-trace` HDF5 file. Options choose what is stored (layers, recursion steps, timesteps,
token stride, probabilities, latents and their projection, decoded early-exit states,
guidance branches) and causal interventions (`--force-expert`, `--ablate-expert`). The
expected size is printed before anything is written, and `--max-gb` refuses a larger trace.
Bad input: one line `error: ...` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


from cli_common.command import (
    Parser,
    env_int,
    finite_float,
    guard_startup,
    int_at_least,
    positive_int,
    read_lines,
    run_main,
)
from cli_common.errors import OutputError, UsageError
from cli_common.outputs import check_free_space, check_output, os_error_reason, sha256_file

guard_startup(__name__)

if TYPE_CHECKING:  # annotations only: the start-up imports stay light
    from rsr_model.recorders import SamplingRecorder
    from rsr_model.tasks.base import Model
    from traces import SampleTable, SamplingLayout, SamplingWriter, TraceMeta


def int_list(s: str) -> list[int]:
    """'0,2,5' or '0:8' (range) or '0:28:4'; a list that selects nothing, or names an index twice, is
    refused (a selection is a set of hook points: a repeated one would be one cell the writer fills
    twice over, or a cell planned and never written)."""
    try:
        if ":" in s:
            parts = [int(p) if p else None for p in s.split(":")]
            start, stop, step = (parts + [None, None])[:3]
            if stop is None or step == 0:
                raise ValueError
            values = list(range(start or 0, stop, step or 1))
        else:
            values = [int(x) for x in s.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,2,5 or a range 0:28:4, got {s!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{s!r} selects nothing (a reversed or empty range?)")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{s!r} names {', '.join(map(str, repeated))} more than once; "
                                         f"give each index once")
    return values


def build_parser() -> argparse.ArgumentParser:
    from rsr_model.tasks.inputs import add_task_arguments

    p = Parser(prog="python -m probes.record", description=__doc__.splitlines()[0], version=True)
    p.add_argument("--ckpt", type=Path, default=Path("sd3_rsr.pt"))
    p.add_argument("--prompts", help="a text file (one prompt or label per line) or the prompt itself")
    add_task_arguments(p, "record")  # a task's own item flags, e.g. FrozenLake's --maps
    p.add_argument("--num-samples", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--out", type=Path, default=Path("runs/trace.h5"),
                   help="trace file (default runs/trace.h5, in runs/ that the dashboard serves by default)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sample j uses seed + j")
    p.add_argument("--steps", type=positive_int, default=28, help="sampler steps")
    p.add_argument("--guidance", type=finite_float(0, 100), default=3.0)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--rank", type=int, help="record only samples rank::world-size (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of ranks (default: $WORLD_SIZE or 1); "
                   "join rank files with python -m traces join")
    g = p.add_argument_group("what to store")
    g.add_argument("--layers", type=int_list, help="RSR block indices (default: all)")
    g.add_argument("--rsr-steps", type=int_list, help="recursion steps (default: all)")
    g.add_argument("--timesteps", type=int_list, help="sampler step indices, e.g. 0:28:4 (default: all)")
    g.add_argument("--token-stride", type=positive_int, default=1)
    g.add_argument("--tokens", type=int_list, help="explicit token ids (overrides --token-stride)")
    g.add_argument("--probs", action="store_true", help="store gate probabilities (float16)")
    g.add_argument("--latent-tokens", type=int_at_least(0), default=0, help="store h_l of this many tokens")
    g.add_argument("--latent-dim", type=positive_int, help="project stored latents to this many dims")
    g.add_argument("--decode", action="store_true", help="store early-exit decoded images per layer and step")
    g.add_argument("--branches", help="cond,uncond (default: every branch that runs)")
    g.add_argument("--max-gb", type=finite_float(0, low_open=True), default=2.0, help="refuse to write a larger trace")
    g.add_argument("--portable", action="store_true",
                   help="gzip instead of Blosc: plain h5py/h5dump/HDFView read it without hdf5plugin (larger)")
    i = p.add_argument_group("interventions")
    i.add_argument("--force-expert", type=int_at_least(0), help="force this expert")
    i.add_argument("--ablate-expert", type=int_at_least(0), help="remove this expert's adapter where it was chosen")
    i.add_argument("--region", help="token-grid region ROWS,COLS like 0:4,0:8 (default: all tokens)")
    i.add_argument("--t-window", help="model timestep window A:B, inclusive (default: all)")
    i.add_argument("--at-step", type=int, help="recursion step of the intervention (default: all)")
    i.add_argument("--at-layers", type=int_list, help="layers of the intervention (default: all)")
    return p


def read_items(text: str) -> list[str]:
    """--prompts: a file of prompts (one per line) or the prompt itself (never a folder's path)."""
    path = Path(text)
    if len(text) < 4096 and path.is_dir():
        raise UsageError(f"--prompts {text} is a folder; give a file of prompts (one per line) or the prompt itself")
    if path.suffix in (".txt", ".csv", ".lst") or (len(text) < 4096 and path.is_file()):
        return read_lines(path)
    if not text.strip():
        raise UsageError("--prompts is empty")
    return [text.strip()]


# The flags each recording mode reads. A recording of FrozenLake plans (--maps) is one forward
# pass per map: no sampler, no seeds, no shards, no selection and no intervention, so any other
# flag given with --maps would be ignored; it is refused before the checkpoint loads instead.
MAP_RECORDING = frozenset({"ckpt", "maps", "out", "overwrite", "batch_size", "probs", "portable"})


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the options `argv` names (whatever their value, the default included)."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        names, _ = parser.parse_known_args(argv)
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
    return set(vars(names))


def check_applicable(args, given: set[str]) -> None:
    """Refuse a flag the recording mode would ignore (the table above)."""
    if getattr(args, "maps", None):
        extra = sorted(given - MAP_RECORDING)
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise UsageError(f"{flag} does not apply to a recording of --maps (one plan per map: no sampler, "
                             f"selection, shards or interventions); it takes only "
                             f"{', '.join('--' + f.replace('_', '-') for f in sorted(MAP_RECORDING))}")


def check_args(args) -> None:
    """What can be judged before any model is loaded: outputs, ranks, flags that need others."""
    check_output(args.out, args.overwrite, inputs={"--ckpt": args.ckpt, "--prompts": item_file(args.prompts),
                                                   "--maps": item_file(getattr(args, "maps", None))})
    shard(args)
    if args.prompts is not None:
        read_items(args.prompts)  # an empty file or a folder: refused before the checkpoint loads
    if args.latent_dim is not None and not args.latent_tokens:
        raise UsageError("--latent-dim projects stored latents; give --latent-tokens N too")
    intervening = args.force_expert is not None or args.ablate_expert is not None
    for flag in ("region", "t_window", "at_step", "at_layers"):
        if getattr(args, flag) is not None and not intervening:
            raise UsageError(f"--{flag.replace('_', '-')} places an intervention; give --force-expert or "
                             f"--ablate-expert too")


def item_file(text: str | None) -> Path | None:
    """The file an item flag names, if it names one (it may be the prompt itself)."""
    return Path(text) if text and len(text) < 4096 and Path(text).exists() else None


def shard(args) -> tuple[int, int]:
    """(rank, world size) from the flags or the launcher's environment."""
    rank = args.rank if args.rank is not None else env_int("RANK", 0)
    world = args.world_size if args.world_size is not None else env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"--rank must lie in 0..world-size-1, got rank {rank} of {world}")
    return rank, world


def run_id(ckpt_sha256: str, items: list, args, world: int) -> str:
    """The same for every rank of one recording (same checkpoint, prompts, seeds and settings),
    different for another recording: what `traces join` checks before it joins rank files."""
    plan = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
            if k not in ("rank", "out", "overwrite", "ckpt", "prompts")}  # paths: the hash and the items say it
    text = json.dumps([ckpt_sha256, [str(i) for i in items], plan, world], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def run(args: argparse.Namespace) -> None:
    """Load the checkpoint, then record as its task does: the diffusion sampler's routing by
    default, the task's own trace where it has one (FrozenLake: one plan per map)."""
    from rsr_model.sample import load_model
    from rsr_model.tasks.inputs import check_items, check_some_items

    split_for_ranks(args)  # under a launcher: this rank's file, joined into --out by the last rank
    check_args(args)
    check_some_items(args, "record")
    model = load_model(args.ckpt)
    if model[2] is None:
        raise UsageError(f"{args.ckpt} has no RSR layers (a base-stage checkpoint); nothing to record")
    check_items(model[0], args, "record")
    own = model[0].commands()
    (own.record if own else record_samples)(args, model)
    join_if_last(args)


def rank_path(out: Path, rank: int) -> Path:
    """run.h5 -> run.rank0.h5: the rank files `traces join` joins (README)."""
    return out.with_name(f"{out.stem}.rank{rank}{out.suffix}")


def split_for_ranks(args: argparse.Namespace) -> None:
    """Under `torchrun` / `accelerate launch` ($WORLD_SIZE > 1, no --rank flag), each rank writes
    run.rankR.h5 beside --out, and --out becomes the joined trace (`args.joined`). Explicit
    --rank/--world-size keep the old contract: this process writes --out, the user joins."""
    args.joined = None
    if args.rank is not None or args.world_size is not None or env_int("WORLD_SIZE", 1) <= 1:
        return
    rank, _ = shard(args)
    check_output(args.out, args.overwrite)
    args.joined, args.out = args.out, rank_path(args.out, rank)


def join_if_last(args: argparse.Namespace) -> None:
    """After this rank's file is closed: if every rank file is complete, join them into --out.

    No process group is needed: each rank closes its file before it looks at the others, so
    the last to finish sees all complete; when two finish together, an exclusive lock file
    lets one of them join."""
    from traces import open_trace
    from traces.vds import join_ranks

    if getattr(args, "joined", None) is None:
        return
    rank, world = shard(args)
    paths = [rank_path(args.joined, r) for r in range(world)]

    def complete(path: Path) -> bool:
        try:
            with open_trace(path) as r:
                return bool(r.complete)
        except Exception:  # absent, or still being written by its rank: not complete
            return False

    if not all(complete(p) for p in paths):
        print(f"rank {rank}: wrote {args.out}; the last rank to finish joins the rank files into {args.joined}")
        return
    lock = args.joined.with_name(f".{args.joined.name}.joining")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"rank {rank}: wrote {args.out}; another rank joins the rank files into {args.joined}")
        return
    try:
        newest = max(p.stat().st_mtime for p in paths)
        if not (args.joined.exists() and args.joined.stat().st_mtime >= newest):  # not joined just now by another
            join_ranks(paths, args.joined, overwrite=True)  # --out was checked before recording
    finally:
        os.close(fd)
        lock.unlink()
    print(f"joined {world} rank files into {args.joined} (virtual datasets: keep the rank files beside it)")


def record_samples(args: argparse.Namespace, model: Model) -> None:
    """The diffusion sampler's recording: N samples per prompt, this rank's share, in one trace."""
    from rsr_model.recorders import sample_table
    from traces import estimate_sampling

    task, transformer, rsr, ckpt = model
    items = task.parse_items(read_items(args.prompts))
    rank, world = shard(args)
    sample_ids = range(len(items) * args.num_samples)[rank::world]  # a range: no list is built yet
    if not sample_ids:
        raise UsageError(f"rank {rank} of {world} has no samples to record")
    rec = sampling_recorder(args, task, transformer, rsr)
    # Size and disk before any per-sample list: the estimate needs only the count.
    layout = rec.layout()
    est = estimate_sampling(layout, len(sample_ids), portable=args.portable)
    if est.total > args.max_gb * 2**30:
        raise UsageError(f"expected trace size {human_size(est.total)} exceeds --max-gb {args.max_gb:g} "
                         f"({human_size(args.max_gb * 2**30)}); record fewer samples, timesteps, tokens or extras")
    check_free_space(args.out, est.total, f"the trace ({len(sample_ids)} samples)")
    rows = [items[i // args.num_samples] for i in sample_ids]
    seeds = [args.seed + i for i in sample_ids]
    samples = sample_table(task, rows, seeds, list(sample_ids))
    est = estimate_sampling(layout, len(rows), samples, portable=args.portable)
    print(f"recording {len(rows)} sample(s) x {len(layout.timesteps)} timestep(s) x {len(layout.layer_ids)} layer(s) "
          f"x {len(layout.step_ids)} step(s) x {len(layout.token_ids)} token(s); {est}", file=sys.stderr)
    ckpt_sha256 = sha256_file(args.ckpt)
    writer = sampling_writer(args, layout, samples, trace_meta(args, model, rec, ckpt_sha256, seeds),
                             rank, world, run_id(ckpt_sha256, items, args, world))
    write_samples(args, rec, writer, rows, seeds, list(sample_ids))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB; expected {est.total / 2**20:.2f} MiB)")
    for iv in rec.interventions_applied():
        print(f"{iv['kind']} expert {iv['expert']}: changed {iv['tokens_changed']} routing decision(s)"
              + ("; it never fired" if not iv["tokens_changed"] else ""))


def human_size(n: float) -> str:
    """Bytes in the unit that shows them (a 30 KiB trace is not "0.00 GB")."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} GiB"


def sampling_recorder(args: argparse.Namespace, task, transformer, rsr) -> SamplingRecorder:
    """The recorder of the selected hook points, with the interventions the flags place."""
    from rsr_model.recorders import SamplingRecorder, Selection

    from .interventions import from_cli, sampled_timesteps

    sel = Selection(layers=args.layers, steps=args.rsr_steps, timesteps=args.timesteps,
                    token_stride=args.token_stride, tokens=args.tokens, probs=args.probs,
                    latent_tokens=args.latent_tokens, latent_dim=args.latent_dim, decode=args.decode,
                    branches=args.branches.split(",") if args.branches else None)
    try:
        rec = SamplingRecorder(task, transformer, rsr, sel, steps=args.steps, guidance=args.guidance)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rec.interventions = from_cli(rsr, args.force_expert, args.ablate_expert, args.region, args.t_window,
                                 args.at_step, args.at_layers, grid=rec.grid,
                                 timestep_values=sampled_timesteps(task, args.steps))
    return rec


def trace_meta(args: argparse.Namespace, model: Model, rec: SamplingRecorder, ckpt_sha256: str,
               seeds: list[int]) -> TraceMeta:
    """The trace's metadata: checkpoint, sampler, interventions, token grid."""
    from traces import TraceMeta

    task, _, rsr, ckpt = model
    return TraceMeta(
        model_config={"preset": ckpt["preset"], **ckpt["backbone"]}, rsr_config=rsr.config.to_dict(),
        checkpoint_sha256=ckpt_sha256, seeds=seeds,
        scheduler={"name": "FlowMatchEulerDiscreteScheduler", "shift": task.shift, "num_inference_steps": args.steps,
                   "guidance_scale": args.guidance},
        extra={"interventions": [iv.to_dict() for iv in rec.interventions], "mode": ckpt.get("mode"),
               "token_grid": list(rec.grid), "text_encoder": ckpt.get("text_encoder")})


def sampling_writer(args: argparse.Namespace, layout: SamplingLayout, samples: SampleTable, meta: TraceMeta,
                    rank: int, world: int, rid: str) -> SamplingWriter:
    from traces import SamplingWriter

    return SamplingWriter(args.out, layout, samples, meta, rank=rank, world_size=world, overwrite=args.overwrite,
                          portable=args.portable, run_id=rid)


def write_samples(args: argparse.Namespace, rec: SamplingRecorder, writer: SamplingWriter, rows: list,
                  seeds: list[int], sample_ids: list[int]) -> None:
    """Sample and write; on any failure the file keeps every flushed step, marked incomplete."""
    from tqdm import tqdm

    try:
        with tqdm(total=len(rows) * args.steps, desc="record", unit="img-step", file=sys.stderr) as bar:
            rec.record(writer, rows, seeds, batch_size=args.batch_size, progress=bar, sample_ids=sample_ids)
    except OSError as e:
        writer.abort()
        raise OutputError(f"writing {args.out} failed ({os_error_reason(e)}); it holds every step flushed "
                          f"before, marked incomplete") from None
    except BaseException:
        writer.abort()
        raise
    applied = rec.interventions_applied()
    writer.close(attrs={"interventions": applied} if applied else None)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser()
        args = parser.parse_args(argv)
        check_applicable(args, given_flags(parser, argv))
        run(args)

    return run_main(body,
                    interrupted="interrupted; the trace holds every step written so far")


if __name__ == "__main__":
    sys.exit(main())
