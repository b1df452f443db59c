"""Exports: GenEval's and DPG-Bench's folder layouts from a tiny checkpoint."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from rsr_model.__main__ import main
from rsr_model.evaluation.export import dpg_grid

from .conftest import one_error_line

FAST = ["--batch-size", "4", "--save-every", "1"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "tiny.pt"
    assert main(["train", "--out", str(path), *FAST, "--steps", "2"]) == 0
    return path


def test_geneval_layout(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    meta = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a red circle"}
    prompts.write_text(json.dumps(meta) + "\nthree squares\n")
    out = tmp_path / "geneval"
    assert main(["evaluate", "--export", "geneval", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts),
                 "--out", str(out), "--samples-per-prompt", "3", "--sample-steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for folder in out.iterdir():  # what GenEval's evaluate_images.py reads
        assert folder.name.isdigit()
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 1 and "tag" in json.loads(lines[0]) and "include" in json.loads(lines[0])
        samples = sorted(p.name for p in (folder / "samples").iterdir())
        assert samples == ["0000.png", "0001.png", "0002.png"] and all(re.match(r"\d+\.png", s) for s in samples)
        assert Image.open(folder / "samples" / "0000.png").size == (24, 24)
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == meta
    counting = json.loads((out / "00001" / "metadata.jsonl").read_text())
    assert counting["tag"] == "counting" and counting["exclude"] == [{"class": "square", "count": 4}]


def test_dpg_layout(tiny_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts12.txt").write_text("a red circle left of a blue square\n")
    (prompts / "coco7.txt").write_text("two triangles\n")
    out = tmp_path / "dpg"
    assert main(["evaluate", "--export", "dpg", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts),
                 "--out", str(out), "--sample-steps", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coco7.png", "partiprompts12.png"]
    assert Image.open(out / "coco7.png").size == (48, 48)  # 2x2 tiles of 24 px: --resolution 24
    # the grid's tiles are the samples in the evaluator's crop order
    tiles = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    grid = dpg_grid(tiles)
    for k, (x, y) in enumerate([(0, 0), (2, 0), (0, 2), (2, 2)]):
        assert np.array_equal(grid[y:y + 2, x:x + 2], tiles[k])
    # DPG images hold four samples; an export into a used folder is refused
    capsys.readouterr()
    assert main(["evaluate", "--export", "dpg", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "x"), "--samples-per-prompt", "3"]) == 2
    assert "hold 4 samples" in one_error_line(capsys.readouterr().err)
    assert main(["evaluate", "--export", "dpg", "--ckpt", str(tiny_ckpt), "--prompts", str(prompts),
                 "--out", str(out)]) == 2
    assert "not an empty folder" in one_error_line(capsys.readouterr().err)
