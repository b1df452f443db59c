"""Report, derived projections and causal effects on a real recorded trace of the tiny model."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from probes.analysis import Options, analyze, jsonable
from probes.causal import causal_effect
from probes.interventions import Intervention
from probes.projections import derive, load_derived
from probes.record import main as record_main
from probes.report import main as report_main
from traces import open_trace

from .conftest import one_error_line


@pytest.fixture(scope="module")
def env(tiny_ckpt, tiny_trace, tmp_path_factory):
    """The session's tiny checkpoint and its trace (tests/conftest.py: 3 prompts x 2 seeds,
    probabilities, 16 latent tokens), read only; `dir` is this module's own folder."""
    d = tmp_path_factory.mktemp("report")
    return {"dir": d, "ckpt": tiny_ckpt, "trace": tiny_trace, "prompts": tiny_trace.with_name("prompts.txt")}


def test_load_shares_and_counts_agree_with_ids(env):
    with open_trace(env["trace"]) as tr:
        K = len(tr.coords["expert"])
        ids, counts = tr.routing(), tr.counts()
        assert np.array_equal(tr.coords["token"], np.arange(ids.shape[-1]))  # all tokens stored
        share = counts / counts.sum(axis=-1, keepdims=True)
        assert np.allclose(share.sum(axis=-1), 1.0)
        from_ids = (ids[..., None] == np.arange(K)).sum(axis=-2)
        assert np.array_equal(from_ids, counts)
        r = analyze(tr, Options(n_perm=19, linear_probes=False))
    assert r["checks"]["counts_vs_ids_max_abs_diff"] == 0
    assert r["checks"]["share_sum_max_abs_dev"] < 1e-12
    for lo in r["layers"].values():
        for d in lo["steps"].values():
            assert abs(sum(d["load"]["share"]) - 1) < 1e-9
            assert all(abs(sum(s) - 1) < 1e-9 for s in d["share_by_timestep"]["share"])
            assert d["load"]["n"] == counts.shape[0] * counts.shape[1] * counts.shape[2] * ids.shape[-1]


def test_ablated_ids_are_left_out_of_every_statistic(env):
    """A trace recorded with --ablate-expert holds id 254 where the expert was ablated: those
    records are counted as invalid and excluded, and what remains still adds up."""
    from rsr_model.recorders import ABLATED

    trace = env["dir"] / "ablated.h5"
    assert record_main(["--ckpt", str(env["ckpt"]), "--prompts", str(env["prompts"]),
                        "--num-samples", "2", "--steps", "4", "--out", str(trace), "--probs",
                        "--ablate-expert", "0", "--at-step", "1"]) == 0
    with open_trace(trace) as tr:
        K = len(tr.coords["expert"])
        steps = [int(s) for s in tr.coords["step"]]
        ids, counts = tr.routing(), tr.counts()
        r = analyze(tr, Options(n_perm=19, linear_probes=False))
    n_ablated = int((ids == ABLATED).sum())
    assert n_ablated > 0 and int((ids >= K).sum()) == n_ablated  # nothing unwritten
    assert r["checks"]["records"] == ids.size
    assert r["checks"]["invalid_records"] == n_ablated
    assert any("invalid" in n for n in r["notes"])
    valid_counts = (ids[..., None] == np.arange(K)).sum(axis=-2)  # ids >= K match no expert
    assert np.array_equal(valid_counts, counts)
    assert r["checks"]["counts_vs_ids_max_abs_diff"] == 0
    assert r["checks"]["share_sum_max_abs_dev"] < 1e-12
    for li, (layer, lo) in enumerate(r["layers"].items()):
        for si, step in enumerate(steps):
            d = lo["steps"][str(step)]
            n_valid = int((ids[:, :, :, li, si] < K).sum())
            assert abs(sum(d["load"]["share"]) - 1) < 1e-9
            assert d["load"]["n"] == n_valid
            assert all(abs(sum(s) - 1) < 1e-9 for s in d["share_by_timestep"]["share"])
            assert d["mi"]["timestep_bin"]["n"] == n_valid  # MI tables hold the valid ids only
            assert d["gate"]["n"] == n_valid
            assert abs(sum(d["gate"]["load_share"]) - 1) < 1e-9
            if step == 1:
                assert n_valid < ids[:, :, :, li, si].size
                assert d["load"]["share"][0] == 0  # the ablated expert got nothing there
        n_trans = sum(v["n"] for v in lo["transitions"].values())
        both = (ids[:, :, :, li, :-1] < K) & (ids[:, :, :, li, 1:] < K)
        assert n_trans == int(both.sum())


def test_training_trace_load_and_sampling_disagreement(training_trace):
    trace = training_trace  # 4 steps of batch 3, routing with probabilities on steps 2 and 4
    r = analyze(str(trace), Options(n_perm=19, linear_probes=False))
    assert r["trace"]["kind"] == "training" and r["trace"]["events"] == 6
    assert r["checks"]["invalid_records"] == 0 and r["checks"]["counts_vs_ids_max_abs_diff"] == 0
    assert r["checks"]["share_sum_max_abs_dev"] < 1e-12
    dis = [r["global"]["gate"]["disagreement"]]
    for lo in r["layers"].values():
        assert abs(sum(lo["load"]["share"]) - 1) < 1e-9
        for d in lo["steps"].values():
            assert abs(sum(d["load"]["share"]) - 1) < 1e-9
            assert all(abs(sum(b["share"]) - 1) < 1e-9 for b in d["load_by_timestep_bin"] if b["n"])
            dis.append(d["gate"]["disagreement"])
            dis += [b["disagreement"] for b in d["gate_by_timestep_bin"] if b["n"]]
    assert all(x is not None and 0.0 <= x <= 1.0 for x in dis)
    # specialization over training: one window per recorded step here (steps 2 and 4)
    curves = r["training_curves"]
    assert curves["window_start_step"] == curves["window_end_step"] == [2, 4]
    assert curves["records"][0] == curves["records"][1] and sum(curves["records"]) == r["checks"]["records"]
    with open_trace(trace) as tr:
        logged = tr.train()  # every step: steps 1-2 go to the first window, 3-4 to the second
    assert curves["loss"] == pytest.approx([float(np.mean(logged["loss"][:2])), float(np.mean(logged["loss"][2:]))])
    with open_trace(trace) as tr:  # window 0 = the events of training step 2, from the stored probabilities
        prob, steps = tr.read("/routing/prob").astype(np.float64), tr.events()["step"]
    p = prob[steps == 2]  # (events, layer, step, token, K)
    K = p.shape[-1]
    want = (-(p * np.log(np.clip(p, 1e-300, 1))).sum(-1) / np.log(K)).mean(axis=(0, 3))  # (layer, step)
    # /routing/prob is stored as float16: the tolerance is that of the data
    assert np.asarray(curves["gate_norm_entropy"][0]) == pytest.approx(want, rel=1e-5)
    top = np.sort(p, axis=-1)
    assert np.asarray(curves["gate_margin"][0]) == pytest.approx((top[..., -1] - top[..., -2]).mean(axis=(0, 3)),
                                                                 rel=1e-5, abs=1e-6)
    for window in curves["load_share"]:
        assert all(abs(sum(s) - 1) < 1e-9 for layer in window for s in layer)
    assert np.asarray(curves["mi_timestep_bin"]["mi"]).shape == (len(curves["records"]), 1, 3)


def test_report_cli_table_json_figures(env, capsys):
    d = env["dir"]
    out, figs = d / "r.json", d / "figs"
    assert report_main([str(env["trace"]), "--json", str(out), "--figures", str(figs), "--permutations", "19"]) == 0
    text = capsys.readouterr().out
    assert "load share" in text and "MaxVio" in text and "linear probes" in text
    r = json.loads(out.read_text())
    assert r["schema"] == "rsr-report" and r["schema_version"] == 5
    for key in ("trace", "options", "timestep_bins", "checks", "global", "layers", "linear_probes", "notes"):
        assert key in r
    layer = r["layers"][str(r["trace"]["layers"][0])]
    for key in ("steps", "load", "mi", "transitions", "convergence"):
        assert key in layer
    step = layer["steps"]["0"]
    for key in ("load", "load_by_timestep_bin", "load_by_branch", "share_by_timestep", "gate", "mi", "spatial",
                "stability"):
        assert key in step
    assert {"timestep_bin", "position", "branch", "prompt"} <= set(step["mi"])
    for key in ("mi", "mi_mm", "ami", "p_value", "mi_corrected", "lift"):
        assert key in step["mi"]["prompt"]
    assert {"seeds", "adjacent_timesteps", "branches"} <= set(step["stability"])
    assert step["gate"]["z_loss"] is None and any("z-loss" in n for n in r["notes"])
    for name in ("expert_share_by_timestep.png", "latent_trajectories.png"):
        png = (figs / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # never overwrite without --overwrite
    assert report_main([str(env["trace"]), "--json", str(out), "--no-probes"]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "foreign", "unwritable", "bad_bins"])
def test_bad_input_exits_2_with_one_line(env, tmp_path, capsys, case):
    args = [str(env["trace"]), "--no-probes"]
    if case == "missing":
        args[0] = str(tmp_path / "nope.h5")
    elif case == "foreign":
        import h5py

        with h5py.File(tmp_path / "f.h5", "w") as f:
            f["x"] = 1
        args[0] = str(tmp_path / "f.h5")
    elif case == "unwritable":
        (tmp_path / "file").write_text("")  # a file where a folder should be (missing folders are created)
        args += ["--json", str(tmp_path / "file" / "r.json")]
    else:
        args += ["--timestep-bins", "0"]
    assert report_main(args) == 2
    one_error_line(capsys.readouterr().err)


def test_derived_written_with_parameters_and_reread(env, tmp_path):
    trace = tmp_path / "d.h5"
    shutil.copy(env["trace"], trace)
    derive(trace, n_components=3)
    d = load_derived(trace)
    with open_trace(trace) as tr:
        lat = tr.latents()
        assert tr.has("/derived/pca/coords")
        sel = tr.read("/derived/pca/coords", sample=0, layer=int(tr.coords["layer"][0]))
    coords = d["pca"]["coords"]
    assert coords.shape == lat.shape[:-1] + (3,)
    assert sel.shape == coords[0, :, :, 0].shape
    (layer, params), = d["pca"]["params"].items()
    assert params["method"] == "pca" and params["n_components"] == 3 and params["n_features"] == lat.shape[-1]
    # coordinates are the stored projection of the stored latents
    x = lat[1, 0, 2, 0].astype(np.float32)
    z = (x - d["pca"]["mean"][0]) @ d["pca"]["components"][0].T
    assert np.allclose(z, coords[1, 0, 2, 0], atol=1e-3)
    with pytest.raises(Exception, match="overwrite"):
        derive(trace)


def test_causal_effect_zero_when_nothing_changes_and_nonzero_when_forced(env):
    from rsr_model.sample import load_model

    from .conftest import randomize_rsr

    task, transformer, rsr, _ = load_model(env["ckpt"])
    randomize_rsr(rsr, scale=0.2)
    items, seeds = ["a green triangle", "two red circles left of a blue square"], [0, 1]
    never = Intervention("ablate", 0, t_min=5000.0, t_max=6000.0)  # timesteps lie in [0, 1000]
    r0 = causal_effect(task, transformer, rsr, items, seeds, [never], steps=3, guidance=2.0)
    assert r0["denoiser"]["mse"] == 0 and r0["final"]["mse"] == 0 and r0["image_mean_abs_diff"] == 0
    assert r0["interventions"][0]["tokens_changed"] == 0  # the result says it never fired
    r1 = causal_effect(task, transformer, rsr, items, seeds, [Intervention("force", 1)], steps=3, guidance=2.0)
    assert r1["denoiser"]["pooled_relative_change"] > 1e-3
    assert r1["final"]["pooled_relative_change"] > 1e-3
    assert len(r1["denoiser_by_timestep"]) == 3
    assert r1["interventions"][0]["tokens_changed"] > 0


# --------------------------------------------------------------------------- the report's contract

REPORT_DOC = Path(__file__).resolve().parents[1] / "probes" / "REPORT.md"


def _documented_paths() -> tuple[set[str], set[str]]:
    """(required, optional) key patterns of probes/REPORT.md, `{Type}` expanded."""
    text = REPORT_DOC.read_text()
    type_block = text.split("```")[1]
    key_block = text.split("## Key paths")[1].split("```")[1]
    types = {line.split()[0]: line.split()[1:] for line in type_block.strip().splitlines()}
    required, optional = set(), set()
    for line in key_block.strip().splitlines():
        path = line.split()[0]
        target = optional if path.endswith("?") else required
        path = path.rstrip("?")
        m = re.fullmatch(r"(.*)\.\{(\w+)\}", path)
        target.update(f"{m.group(1)}.{field}" for field in types[m.group(2)]) if m else target.add(path)
    return required, optional


def _report_paths(x, prefix: str = "") -> set[str]:
    """Leaf key paths of a JSON value: lists of objects become `name[]`, other lists are leaves."""
    if isinstance(x, dict) and x:
        return set().union(*(_report_paths(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in x.items()))
    if isinstance(x, list) and x and all(isinstance(v, dict) for v in x):
        return set().union(*(_report_paths(v, prefix + "[]") for v in x))
    return {prefix}


def _matches(pattern: str, path: str) -> bool:
    """`pattern` from REPORT.md: `<name>` matches any key, a final `*` any subtree."""
    want, have = pattern.split("."), path.split(".")
    if want[-1] == "*":
        want, have = want[:-1], have[: len(want) - 1]
    if len(want) != len(have):
        return False
    for w, h in zip(want, have):
        regex = "".join("[^.]+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]*>)", w))
        if not re.fullmatch(regex, h):
            return False
    return True


def test_report_json_is_the_documented_contract(env, training_trace, tmp_path):
    """Every key path REPORT.md promises is in a real report (CLI, --derive, --compare), and
    every key path of the report is documented."""
    trace = tmp_path / "t.h5"
    shutil.copy(env["trace"], trace)
    out = tmp_path / "r.json"
    assert report_main([str(trace), "--json", str(out), "--permutations", "9", "--derive",
                        "--compare", str(env["trace"])]) == 0
    paths = _report_paths(json.loads(out.read_text()))
    required, optional = _documented_paths()
    assert len(required) > 100
    undocumented = {p for p in paths if not any(_matches(d, p) for d in required | optional)}
    missing = {d for d in required if not any(_matches(d, p) for p in paths)}
    assert not undocumented, sorted(undocumented)
    assert not missing, sorted(missing)
    # a training trace holds only documented keys too
    paths = _report_paths(jsonable(analyze(str(training_trace), Options(n_perm=0, linear_probes=False))))
    assert not {p for p in paths if not any(_matches(d, p) for d in required | optional)}


# --------------------------------------------------------------------------- prompt attributes


def test_prompt_attributes_come_from_the_trace(env):
    """The recorder writes the task's prompt attributes into /samples/scene; the MI labels are
    read from there (any attribute names), and a trace without them gets a note."""
    with open_trace(env["trace"]) as tr:
        scenes = list(tr.samples()["scene"])
        r = analyze(tr, Options(n_perm=0, linear_probes=False))
    first = scenes[0] if isinstance(scenes[0], dict) else json.loads(scenes[0])
    assert first["attributes"] == {"colour": "red", "shape": "circle", "count": "2", "relation": "left of"}
    step = next(iter(next(iter(r["layers"].values()))["steps"].values()))
    assert "colour" in step["mi"]  # red, green, red: a partition of its own
    assert any(n.startswith("shape MI skipped") for n in r["notes"])


def test_trace_without_prompt_attributes_gets_a_note(tmp_path):
    path = _write_trace(tmp_path / "old.h5", np.zeros((3, 2, 8), np.uint8), scene=[{"caption": "a red circle"}] * 2)
    r = analyze(str(path), Options(n_perm=0, linear_probes=False))
    assert any(n.startswith("prompt-attribute MI skipped") for n in r["notes"])


# --------------------------------------------------------------------------- the example probe


def _write_trace(path, ids_by_time: np.ndarray, scene=None):
    """A sampling trace of 2 samples (same prompt), one layer, whose routing at recorded
    timestep t is `ids_by_time[t]` (step, token) for sample 0 and all zeros for sample 1."""
    from traces.layout import SampleTable, SamplingLayout
    from traces.writer import SamplingWriter

    n_t, n_steps, n_tokens = ids_by_time.shape
    layout = SamplingLayout(n_experts=4, layers=[0], steps=n_steps, tokens=n_tokens, timesteps=list(range(n_t)),
                            timestep_values=[900.0 - 400 * t for t in range(n_t)])
    table = SampleTable(prompt=["p", "p"], seed=[0, 1], scene=scene)
    with SamplingWriter(path, layout, table) as w:
        w.begin_batch(2)
        for t in range(n_t):
            e = np.zeros((2, 1, 1, n_steps, n_tokens), np.uint8)
            e[0, 0, 0] = ids_by_time[t]
            w.write_timestep(t, e)
    return path


def test_expert_change_known_answer(tmp_path):
    """Share of tokens whose expert changes between adjacent recorded timesteps, invalid ids
    left out, binned by the earlier timestep."""
    ids = np.zeros((3, 2, 8), np.uint8)  # (timestep, step, token)
    ids[:, 0] = [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 254, 1, 1, 2, 2]]
    ids[:, 1] = [[3] * 8, [3] * 8, [3, 3, 3, 3, 0, 0, 0, 0]]
    path = _write_trace(tmp_path / "k.h5", ids)
    r = analyze(str(path), Options(n_bins=3, n_perm=0, linear_probes=False))
    steps = r["layers"]["0"]["steps"]
    first, second = jsonable(steps["0"]["expert_change"]), jsonable(steps["1"]["expert_change"])
    # sample 0: step 0 changes 2 of 8, then 0 of 7 (one ablated); sample 1 never changes (16 + 16 pairs)
    assert first["n"] == 8 + 7 + 16 and first["share"] == pytest.approx(2 / 31)
    assert [b["n"] for b in first["by_timestep_bin"]] == [16, 15, 0]
    assert first["by_timestep_bin"][0]["share"] == pytest.approx(2 / 16)
    assert first["by_timestep_bin"][2]["share"] is None
    assert second["n"] == 32 and second["share"] == pytest.approx(4 / 32)
    assert second["by_timestep_bin"][1]["share"] == pytest.approx(4 / 16)


def test_expert_change_is_one_minus_adjacent_agreement(env):
    r = analyze(str(env["trace"]), Options(n_perm=0, linear_probes=False))
    for lo in r["layers"].values():
        for d in lo["steps"].values():
            adjacent = d["stability"]["adjacent_timesteps"]
            assert d["expert_change"]["n"] == adjacent["n"]
            assert d["expert_change"]["share"] == pytest.approx(1 - adjacent["agreement"])


def test_probe_families_save_restore_and_merge(env):
    """Every running family's state survives state_dict / load_state_dict, and merging a
    second pass over the same trace doubles the counts and keeps the shares."""
    from probes.analysis.families import FAMILIES
    from probes.analysis.run import stream
    from probes.analysis.setup import Context, grid_of, labels_of

    opt = Options(n_perm=0, linear_probes=False)
    with open_trace(env["trace"]) as tr:
        grid = grid_of(tr, opt)
        context = Context(tr, grid, labels_of(tr, grid)[0], opt)
        passes = [[f(context) for f in FAMILIES] for _ in range(2)]
        for families in passes:
            stream(tr, [f for f in families if f.skipped is None], context)
        fresh = [f(context) for f in FAMILIES]
    # the fixture (sampling) trace has everything but what only training traces give
    assert [f.name for f in fresh if f.skipped is not None] == ["training_curves"]
    for done, new in zip(passes[0], fresh):
        if new.skipped is not None:
            continue
        new.load_state_dict(done.state_dict())
        assert json.dumps(jsonable(new.result().steps), sort_keys=True) == json.dumps(
            jsonable(done.result().steps), sort_keys=True), done.name
    load, again = passes[0][0], passes[1][0]
    before = jsonable(load.result().steps[0, 0]["load"])
    load.merge(again)
    after = jsonable(load.result().steps[0, 0]["load"])
    assert after["n"] == 2 * before["n"] and after["share"] == pytest.approx(before["share"])


def test_verdicts_with_the_checkpoints_routing_value(env, training_trace, tmp_path, capsys):
    """Every step gets a verdict; with the routing value of the trace's own checkpoint it uses it,
    and a barely trained (flat) gate is never called specialized."""
    from probes.routing_value import main as value_main

    value = tmp_path / "rv.json"
    assert value_main(["--ckpt", str(env["ckpt"]), "--samples", "4", "--bins", "2", "--random-draws", "1",
                       "--json", str(value)]) == 0
    out = tmp_path / "r.json"
    assert report_main([str(env["trace"]), "--no-probes", "--json", str(out), "--routing-value", str(value)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["routing_value"]["schema"] == "rsr-routing-value"
    for layer in r["layers"].values():
        for step, d in layer["steps"].items():
            v = d["verdict"]
            assert v["label"] != "specialized" and v["text"] in text
            assert v["evidence"]["routing_value"] == r["routing_value"]["scopes"][step]["value"]
    # a routing value of another checkpoint, or not a routing value at all, is refused in one line
    other = json.loads(value.read_text())
    other["checkpoint_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "junk.json").write_text("{}")
    for bad in ("other.json", "junk.json", "missing.json"):
        assert report_main([str(env["trace"]), "--no-probes", "--routing-value", str(tmp_path / bad)]) == 2
        one_error_line(capsys.readouterr().err)
    capsys.readouterr()  # a training trace has no one checkpoint to match
    assert report_main([str(training_trace), "--no-probes", "--routing-value", str(value)]) == 2
    assert "training trace" in one_error_line(capsys.readouterr().err)
