"""Samples in the folder layouts the official benchmark evaluators read (`evaluate --export`).

GenEval (github.com/djghosh13/geneval, `evaluation/evaluate_images.py IMAGE_FOLDER`):

    OUT/00000/metadata.jsonl     the prompt's line of evaluation_metadata.jsonl (one JSON object)
    OUT/00000/samples/0000.png   one file per sample (the evaluator takes every \\d+.png)
    OUT/00001/...                one folder per prompt, numbered by its line in the prompt file

DPG-Bench (ELLA's `dpg_bench/compute_dpg_bench.py --image-root-path OUT --resolution R --pic-num 4`):

    OUT/<item_id>.png            four samples as a 2x2 grid without borders, each R x R;
                                 item_id is the prompt file's stem in DPG's prompts/ folder

The evaluator lists every file of OUT, so nothing else is written there. Sample j of every
prompt uses sampler seed `seed + j`, as GenEval's generator reseeds for each prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cli_common.command import read_lines
from cli_common.errors import UsageError

from .prompts import geneval_metadata

BENCHMARKS = ("geneval", "dpg")
DPG_GRID = 2  # samples per side of a DPG-Bench image: its evaluator crops four R x R tiles


@dataclass(frozen=True)
class ExportItem:
    name: str  # the folder (GenEval) or file stem (DPG) the samples go to
    prompt: str
    metadata: dict | None  # GenEval's metadata line


def _geneval_items(path: Path) -> list[ExportItem]:
    """GenEval's evaluation_metadata.jsonl, or prompts of the shapes grammar one per line."""
    items = []
    for index, line in enumerate(read_lines(path)):
        if line.startswith("{"):
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {index + 1}: not valid JSON ({e.msg})") from None
            if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
                raise UsageError(f'{path} line {index + 1}: a GenEval metadata line needs a "prompt"')
        else:
            try:
                meta = geneval_metadata(line)
            except ValueError:
                raise UsageError(f"{path} line {index + 1}: {line!r} is neither GenEval metadata (JSON) nor "
                                 f"a prompt of the shapes grammar, so GenEval's checks cannot be written") from None
        items.append(ExportItem(f"{index:05d}", meta["prompt"], meta))
    return items


def _dpg_items(path: Path) -> list[ExportItem]:
    """DPG-Bench's prompts/ folder (item_id = file stem), or one prompt per line (item_id = line index)."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UsageError(f"{path} holds no .txt prompt files (DPG-Bench's prompts/ folder has one per item)")
        return [ExportItem(f.stem, " ".join(read_lines(f)), None) for f in files]
    return [ExportItem(str(index), line, None) for index, line in enumerate(read_lines(path))]


def read_items(path: Path, benchmark: str) -> list[ExportItem]:
    if not path.exists():
        raise UsageError(f"prompt file not found: {path}")
    return _geneval_items(path) if benchmark == "geneval" else _dpg_items(path)


def dpg_grid(images: np.ndarray) -> np.ndarray:
    """uint8 (4, R, R, 3) -> (2R, 2R, 3), tiles in the evaluator's crop order (row by row)."""
    rows = [np.concatenate(list(images[r * DPG_GRID:(r + 1) * DPG_GRID]), axis=1) for r in range(DPG_GRID)]
    return np.concatenate(rows, axis=0)


def _save(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _write_item(out: Path, benchmark: str, item: ExportItem, images: np.ndarray) -> None:
    if benchmark == "dpg":
        _save(dpg_grid(images), out / f"{item.name}.png")
        return
    folder = out / item.name
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(item.metadata) + "\n")
    for j, image in enumerate(images):
        _save(image, folder / "samples" / f"{j:04d}.png")


def export(task, transformer, items: Sequence[ExportItem], out: Path, benchmark: str, samples_per_prompt: int,
           steps: int = 28, guidance: float = 3.0, seed: int = 0, batch_size: int = 64,
           progress: Callable[[int], None] | None = None) -> None:
    """Sample every item `samples_per_prompt` times and write them in the benchmark's layout."""
    from rsr_model.sample import generate

    if benchmark == "dpg" and samples_per_prompt != DPG_GRID ** 2:
        raise UsageError(f"DPG-Bench images hold {DPG_GRID ** 2} samples each; "
                         f"got --samples-per-prompt {samples_per_prompt}")
    per_batch = max(1, batch_size // samples_per_prompt)
    seeds = [seed + j for j in range(samples_per_prompt)]
    for start in range(0, len(items), per_batch):
        chunk = items[start:start + per_batch]
        conditions = task.parse_items([it.prompt for it in chunk for _ in seeds])
        x0 = generate(task, transformer, conditions, seeds * len(chunk), steps=steps, guidance=guidance)
        images = task.to_images(x0).reshape(len(chunk), samples_per_prompt, *x0.shape[2:], 3)
        for item, item_images in zip(chunk, images):
            _write_item(out, benchmark, item, item_images)
        if progress:
            progress(len(chunk))
