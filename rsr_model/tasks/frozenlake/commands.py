"""The navigation preset's command lines:

    python -m rsr_model sample --ckpt frozenlake.pt --map "SFFF/FHFH/FFFH/HFFG" --out plan.png
    python -m probes.record --ckpt frozenlake.pt --maps maps.txt --out plans.h5

`sample` writes the decoded plan as a frame strip (one row per map, frames 0..stop) and prints
the chosen actions. `record` writes an `rsr-trace` sampling file in which a plan lies on the
usual axes (traces/SCHEMA.md, "Navigation plans"): one sample per map, one branch ("cond"),
one timestep (0: there is no diffusion), the RSR block as the layer, latent step l on the step
axis, the map's cells as tokens; /routing/expert holds every token's own vote, /decoded/step
frame l, /decoded/final the frame where the plan stops, /samples/scene the map, the plan and
the true action of every step (the probes' labels `action_step_l`).

Both are reached through `FrozenLake.commands()` after the command line's shared checks (the
output path, the item flags) and the checkpoint's loading; neither command line names the task.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cli_common.command import read_lines
from cli_common.errors import UsageError

from ..base import Model
from . import maps as lake
from .judge import judge, make_plans
from .model import NUM_ACTIONS


def _with_rsr(ckpt: Path, model: Model) -> Model:
    if model[2] is None:
        raise UsageError(f"{ckpt} has no RSR layer")
    return model


def read_maps(text: str) -> list[str]:
    """--maps: a file of maps (one per line) or one map itself."""
    if Path(text).is_file():
        return read_lines(text)
    if text and set(text) <= set(lake.TILES + "/"):
        return [text]
    raise UsageError(f"--maps: file not found: {text}")


def sample(args: argparse.Namespace, model: Model) -> None:
    """`sample --map`: the decoded plan of each map as a strip of frames, and its actions printed."""
    from ...sample import image_grid, save_png

    task, net, rsr, _ = _with_rsr(args.ckpt, model)
    maps = task.parse_items(args.map)
    plans = make_plans(task, net, rsr, maps)
    width = max(p.length for p in plans) + 1
    strip = np.zeros((len(plans), width, *plans[0].frames.shape[1:]), np.uint8)
    for i, plan in enumerate(plans):
        strip[i, :plan.length + 1] = plan.frames[:plan.length + 1]
        verdict = judge(plan)
        print(f"{lake.map_text(plan.map)}: {' '.join(plan.names()) or '(no action)'}"
              f"  [frames: {'goal' if verdict.success_frames else 'no goal'}; "
              f"environment: {'goal' if verdict.success_env else 'hole' if verdict.fell_in_hole else 'no goal'}]")
    save_png(image_grid(strip.reshape(-1, *strip.shape[2:]), cols=width), args.out)
    print(f"wrote {args.out} ({len(plans)} plan(s), frames 0..stop per row)")


def record(args: argparse.Namespace, model: Model) -> None:
    """`probes.record --maps`: one plan per map as an `rsr-trace` sampling file (module doc)."""
    from cli_common.outputs import sha256_file
    from traces import SampleTable, SamplingLayout, SamplingWriter, TraceMeta

    task, net, rsr, ckpt = _with_rsr(args.ckpt, model)
    maps = task.parse_items(read_maps(args.maps))
    plans = make_plans(task, net, rsr, maps, batch_size=args.batch_size)
    L, N = plans[0].votes.shape
    K = NUM_ACTIONS  # the expert axis: RSR's experts, or the shared baseline's action votes
    layout = SamplingLayout(n_experts=K, layers=[net.rsr_block], steps=L, tokens=N, timesteps=[0],
                            timestep_values=[0.0], sigmas=[float("nan")], store_prob=args.probs,
                            image_shape=plans[0].frames.shape[1:], decode_steps=True)
    scenes = [{**task.describe(p.map), "plan": p.names(), "plan_length": p.length,
               "agreement": [round(a, 4) for a in p.agreement]} for p in plans]
    samples = SampleTable(prompt=[lake.map_text(p.map) for p in plans], seed=[0] * len(plans), scene=scenes)
    meta = TraceMeta(model_config={"preset": ckpt["preset"], **ckpt["backbone"]}, rsr_config=rsr.config.to_dict(),
                     checkpoint_sha256=sha256_file(args.ckpt), seeds=[0],
                     scheduler={"name": "none (one forward pass per plan)"},
                     extra={"mode": ckpt.get("mode"), "token_grid": [len(maps[0]), len(maps[0])],
                            "navigation": {"horizon": L - 1, "stop_rule": "goal or hole in the decoded frame, "
                                           "else the horizon"}})
    writer = SamplingWriter(args.out, layout, samples, meta, overwrite=args.overwrite, portable=args.portable)
    try:
        for start in range(0, len(plans), args.batch_size):
            batch = plans[start:start + args.batch_size]
            writer.begin_batch(len(batch))
            votes = np.stack([p.votes for p in batch])[:, None, None]  # (B, branch, layer, L, N)
            prob = np.stack([p.probs for p in batch])[:, None, None] if args.probs else None
            decoded = np.stack([p.frames for p in batch])[:, None, None]  # (B, decoded_branch, layer, L, H, W, C)
            writer.write_timestep(0, votes, prob=prob, decoded=decoded)
            writer.write_final(np.stack([p.frames[p.length] for p in batch]))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    print(f"wrote {args.out} ({len(plans)} plan(s) x {L} latent step(s) x {N} token(s))", file=sys.stderr)
