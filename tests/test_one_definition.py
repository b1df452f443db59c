"""One definition per quantity (issue 18): for each quantity the report and the dashboard (and
the evaluation, the interventions) both show, the dashboard's figure data equal the report's for
the same real trace of the tiny model. Each test fails when a caller computes the quantity its
own way again."""

import base64
import json
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from dashboard.__main__ import make_context
from dashboard.app import create_app
from dashboard.data import trace_id
from dashboard.views.intervene import run_intervention
from dashboard.views.latent import attribute_codes, trajectory_figure
from dashboard.views.routing import token_grid as dashboard_token_grid
from evaluation.routing import SamplingRouting
from probes.analysis.setup import Options, grid_of, labels_of
from probes.interventions import Intervention
from probes.record import main as record_main
from probes.report import figure_latent_trajectories
from probes.report import main as report_main
from probes.routing_value import bin_edges
from probes.stats import routing_agreement
from rsr_model.__main__ import main as rsr_main
from rsr_model.sample import load_model
from traces import open_trace
from traces.bins import timestep_bins

from .test_dashboard import call, text_of

PROMPTS = "two red circles left of a blue square\na green triangle\na red triangle\n"  # attributes split them apart
PERMUTATIONS = "19"  # the dashboard's reports below are computed with this many permutations too


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint with its training trace (every step, probabilities), a sampling trace
    (probabilities, 16-token latents), a copy of it whose routing differs in known cells, and a
    trace of three tokens without a declared grid; `served/` holds all but the last."""
    d = tmp_path_factory.mktemp("one_definition")
    served = d / "served"
    served.mkdir()
    ckpt, train, trace = d / "tiny.pt", served / "train.h5", served / "run.h5"
    assert rsr_main(["train", "--out", str(ckpt), "--steps", "4", "--batch-size", "3", "--trace", str(train),
                     "--trace-every", "1", "--trace-probs"]) == 0
    (d / "prompts.txt").write_text(PROMPTS)
    record = ["--ckpt", str(ckpt), "--prompts", str(d / "prompts.txt"), "--num-samples", "1", "--steps", "4"]
    assert record_main(record + ["--out", str(trace), "--probs", "--latent-tokens", "16"]) == 0
    other = served / "other.h5"
    shutil.copy(trace, other)
    with h5py.File(other, "r+") as f:  # the same grid, prompts and seeds; routing changed in known cells
        ids = f["routing/expert"][()]  # (sample, branch, timestep, layer, step, token)
        ids[..., 0, ::2] = 255  # step 0: half the tokens unwritten, so the cells' record counts differ
        ids[..., 1, ::3] = (ids[..., 1, ::3] + 1) % int(f["routing/prob"].shape[-1])  # step 1: a third moved
        f["routing/expert"][...] = ids
    few = d / "few_tokens.h5"
    assert record_main(record + ["--out", str(few), "--tokens", "0,5,143"]) == 0
    with h5py.File(few, "r+") as f:
        del f.attrs["token_grid"]  # a trace that does not declare its grid: the grid must not be guessed
    return {"dir": d, "ckpt": ckpt, "train": train, "trace": trace, "other": other, "few": few, "served": served}


@pytest.fixture(scope="module")
def app_ctx(env):
    ctx = make_context([str(env["served"])], env["ckpt"], permutations=int(PERMUTATIONS))
    return create_app(ctx), ctx


def report(path, *extra) -> dict:
    """The report as `python -m probes.report` writes it (the options the dashboard uses)."""
    out = path.with_name(path.stem + "-test-report.json")
    assert report_main([str(path), "--json", str(out), "--permutations", PERMUTATIONS, "--no-probes",
                        "--overwrite", *map(str, extra)]) == 0
    return json.loads(out.read_text())


def _array(v) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {dtype, bdata} (plotly >= 6)."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).astype(float)
    return np.asarray(v, dtype=float)


def figures_in(component) -> list[dict]:
    """Every dcc.Graph figure inside a serialised Dash component tree, in page order."""
    if isinstance(component, list):
        return [f for c in component for f in figures_in(c)]
    if isinstance(component, dict):
        props = component.get("props", {})
        return ([props["figure"]] if "figure" in props else []) + figures_in(props.get("children"))
    return []


def test_training_curves_dashboard_equals_report(app_ctx, env):
    app, _ = app_ctx
    body = call(app, "training-body.children", {"tabs.value": "training", "sel-trace.value": trace_id(env["train"])},
                "tabs.value")["training-body"]["children"]
    lines = {t["name"]: t for t in figures_in(body)[1]["data"] if "name" in t}
    curves = report(env["train"])["training_curves"]
    pooled = curves["pooled"]
    assert len(curves["window_start_step"]) == 4  # one window per recorded step
    x = [0.5 * (a + b) for a, b in zip(curves["window_start_step"], curves["window_end_step"])]
    assert np.allclose(_array(lines["MI (nats)"]["x"]), x)
    assert np.allclose(_array(lines["MI (nats)"]["y"]), pooled["mi_timestep_bin"]["mi"])
    band = np.asarray(pooled["mi_timestep_bin"]["null_mean"]) + 2 * np.asarray(pooled["mi_timestep_bin"]["null_std"])
    assert np.allclose(_array(lines["null mean + 2 sd"]["y"]), band)
    assert np.allclose(_array(lines["gate entropy / log K"]["y"]), pooled["gate_norm_entropy"])
    assert np.allclose(_array(lines["top-1 margin"]["y"]), pooled["gate_margin"])
    assert np.allclose(_array(lines["load entropy (normalised)"]["y"]), pooled["load_norm_entropy"])
    share = np.asarray(pooled["load_share"])
    for k in range(share.shape[1]):
        assert np.allclose(_array(lines[f"e{k}"]["y"]), share[:, k])
    # the pooled gate entropy is the token-weighted mean of the per-(layer, step) curves (same tokens each)
    assert np.allclose(pooled["gate_norm_entropy"], np.mean(curves["gate_norm_entropy"], axis=(1, 2)))


def test_figure3_trajectories_dashboard_equals_report(env, tmp_path):
    with open_trace(env["trace"]) as tr:
        drawn = figure_latent_trajectories(tr, tmp_path / "fig3.png")
        fig = trajectory_figure(tr, int(tr.coords["layer"][0]))
        latents = tr.read("/latents/h", layer=int(tr.coords["layer"][0]), branch=0).astype(np.float64)
    assert (tmp_path / "fig3.png").stat().st_size > 0
    want = [xy for line in drawn for xy in [*line["samples"].values(), line["mean"]]]
    got = [np.stack([_array(t.x), _array(t.y)], axis=1) for t in fig.data]
    assert len(got) == len(want) == 4 * (3 + 1)  # 4 timesteps x (3 samples + their mean)
    for g, w in zip(got, want):
        assert np.allclose(g, w)
    # the points are the image means of h_l projected on their own first two principal axes
    means = latents.mean(axis=3)  # (sample, timestep, step, dim)
    rows = {(s, line["timestep"]): xy for line in drawn for s, xy in line["samples"].items()}
    xy = np.concatenate([rows[key] for key in sorted(rows)])
    centred = means.reshape(-1, means.shape[-1]) - means.reshape(-1, means.shape[-1]).mean(axis=0)
    axes = np.linalg.svd(centred, full_matrices=False)[2][:2]
    for j, proj in enumerate((centred @ axes.T).T):
        assert np.allclose(xy[:, j], proj, atol=1e-6) or np.allclose(xy[:, j], -proj, atol=1e-6)


def test_timestep_bins_report_evaluation_and_routing_value(env):
    r = report(env["trace"])
    task, transformer, rsr, _ = load_model(env["ckpt"])
    routing = SamplingRouting(rsr, n_bins=len(r["timestep_bins"]))
    with open_trace(env["trace"]) as tr:
        values = np.asarray(tr.coords["timestep_value"], float)
        # this schedule spaces its steps evenly, so sampler positions and sigma bins coincide
        assert np.array_equal(timestep_bins(np.arange(len(values)), 4, 0, len(values)),
                              timestep_bins(1000 - values, 4, 0, 1000))
        ids = tr.read("/routing/expert")  # (sample, branch, timestep, layer, step, token)
        for t, value in enumerate(values):
            for si in range(ids.shape[4]):
                ctx = SimpleNamespace(timestep=torch.full((ids.shape[0] * ids.shape[1],), value), step=si,
                                      layer=rsr.layer_indices[0])
                cell = torch.as_tensor(ids[:, :, t, 0, si].reshape(-1, ids.shape[-1]).astype(np.int64))
                routing._on_expert(cell, ctx)
    layer, steps = r["layers"][str(rsr.layer_indices[0])], r["layers"][str(rsr.layer_indices[0])]["steps"]
    for si, step in enumerate(steps.values()):
        report_counts = [np.asarray(b["share"]) * b["n"] for b in step["load_by_timestep_bin"]]
        assert np.allclose(routing.counts[0, si], report_counts)
    # probes.routing_value draws bin b's sigmas from the bins the same rule puts them in
    edges = bin_edges(4)
    for b in range(4):
        sigma = np.linspace(edges[b + 1], edges[b], 8)[1:]  # inside the bin, its noisier edge included
        assert (timestep_bins(1000 - 1000 * sigma, 4, 0, 1000) == b).all()
    assert layer["load"]["n"] > 0


def test_gate_entropy_evaluation_equals_report(env):
    """The evaluation's H(gate)/log K and the report's mean_norm_entropy over the same probabilities."""
    r = report(env["trace"])
    _, _, rsr, _ = load_model(env["ckpt"])
    routing = SamplingRouting(rsr)
    with open_trace(env["trace"]) as tr:
        prob = tr.read("/routing/prob")  # (sample, branch, timestep, layer, step, token, K)
    for p in prob.reshape(-1, *prob.shape[-2:]):
        routing._on_probs(torch.as_tensor(p[None].astype(np.float32)), None)
    assert routing.entropy_sum / routing.tokens == pytest.approx(r["global"]["gate"]["mean_norm_entropy"], rel=1e-5)


def test_token_grid_dashboard_equals_report(env):
    for path, want in ((env["trace"], (12, 12)), (env["few"], None)):
        r = report(path)
        with open_trace(path) as tr:
            grid = dashboard_token_grid(tr)
        assert (tuple(r["trace"]["token_grid"]) if r["trace"]["token_grid"] else None) == want
        # a trace without a known grid is drawn as one row, never as a guessed square
        assert grid == (want or (1, 144))
    iv = Intervention("force", 0, rows=(0, 1))  # the interventions' grid: 16 tokens = 4 x 4
    assert iv._token_mask(16, "cpu").nonzero().reshape(-1).tolist() == [0, 1, 2, 3]


def test_agreement_vs_chance_transitions_equal_stability(env):
    """A transition's persistence and chance are the agreement of two routings (steps l, l+1)."""
    r = report(env["trace"])
    with open_trace(env["trace"]) as tr:
        ids, K, layer = tr.read("/routing/expert"), len(tr.coords["expert"]), str(int(tr.coords["layer"][0]))
    for key, tr_ in r["layers"][layer]["transitions"].items():
        a, b = (int(x) for x in key.split("->"))
        agree = routing_agreement(ids[..., 0, a, :], ids[..., 0, b, :], K)
        assert tr_["persistence"] == pytest.approx(float(agree.agreement))
        assert tr_["chance"] == pytest.approx(float(agree.chance))


def test_compare_kappa_dashboard_equals_report(app_ctx, env):
    app, _ = app_ctx
    values = {"tabs.value": "compare", "sel-trace.value": trace_id(env["trace"]),
              "cmp-other.value": trace_id(env["other"])}
    text = text_of(call(app, "compare-body.children", values, "cmp-other.value")["compare-body"]["children"])
    cmp = report(env["trace"], "--compare", env["other"])["compare"]
    kappa = cmp["overall"]["kappa"]
    assert f"kappa {kappa:.3f}" in text
    cells = [c for lo in cmp["layers"].values() for c in lo.values()]
    n = np.array([c["n"] for c in cells], float)
    assert len(set(n)) > 1  # cells with different record counts: weighting matters
    assert kappa == pytest.approx(np.sum([c["kappa"] * c["n"] for c in cells]) / n.sum())
    assert f"{np.mean([c['kappa'] for c in cells]):.3f}" != f"{kappa:.3f}"  # the unweighted mean would show


def test_prompt_attributes_dashboard_equals_report(env):
    with open_trace(env["trace"]) as tr:
        labels, _ = labels_of(tr, grid_of(tr, Options()))
        dashboard = attribute_codes(tr)
    report_labels = {lab.name: lab.codes for lab in labels if lab.kind == "sample" and lab.name in dashboard}
    assert len(report_labels) >= 2  # attributes that split the samples other than the prompt does
    for name, codes in report_labels.items():
        assert np.array_equal(dashboard[name], codes)


def test_causal_before_after_dashboard_equals_probes(app_ctx, env):
    """The Intervene tab's before/after images and differences are probes.causal's."""
    from probes.causal import causal_effect

    _, ctx = app_ctx
    iv = Intervention("force", 0)  # expert 0 is (almost) never chosen by the tiny model: every token changes
    with open_trace(env["trace"]) as tr:
        shown = run_intervention(ctx, tr, sample=0, iv=iv, layer=int(tr.coords["layer"][0]), step=0, t_index=1)
        sched, smp = tr.attrs["scheduler"], tr.samples()
    task, transformer, rsr = ctx.model
    items = task.parse_items([smp["prompt"][0]])
    r = causal_effect(task, transformer, rsr, items, [int(smp["seed"][0])], [iv], int(sched["num_inference_steps"]),
                      float(sched["guidance_scale"]))
    assert shown["image_mean_abs_diff"] == pytest.approx(r["image_mean_abs_diff"])
    assert shown["image_mean_abs_diff"] > 0  # ablating an expert changes the image
    assert shown["routing_changed"] > 0 and (shown["ids_after"] == 0).all()  # forced everywhere
