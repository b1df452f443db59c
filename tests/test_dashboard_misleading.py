"""Issue 21, "Misleading today", on a synthetic trace with known routing: the lift colour scale
reaches K, the Expert page does not draw an expert's token map where it is never chosen, and
follows / precedes says so instead of printing 'nan'."""

import json
from pathlib import Path

import numpy as np
import pytest

from dashboard.app import create_app
from dashboard.common import make_context
from tests.dashboard_browser import call, text_of
from traces import SampleTable, SamplingLayout, SamplingWriter

K = 3


@pytest.fixture(scope="module")
def app_ctx(tmp_path_factory):
    """Expert 2 takes every token at step 0 and none at step 1 (experts 0 and 1 split them)."""
    path = tmp_path_factory.mktemp("misleading") / "t.h5"
    lo = SamplingLayout(n_experts=K, layers=[1], steps=2, tokens=16, timesteps=[0, 1], timestep_values=[900.0, 100.0])
    ids = np.zeros((2, 2, 1, 1, 2, 16), np.uint8)  # sample, timestep, branch, layer, step, token
    ids[..., 0, :] = 2
    ids[..., 1, :] = np.arange(16) % 2
    with SamplingWriter(path, lo, SampleTable(prompt=["a", "b"], seed=[0, 1])) as w:
        w.begin_batch(2)
        for t in range(2):
            w.write_timestep(t, ids[:, t])
    ctx = make_context([str(path)], permutations=0)
    yield create_app(ctx), ctx
    ctx.registry.close()


def expert_page(app, ctx, k, step):
    tid = ctx.registry.ids()[0]
    out = call(app, "expert-body.children", {"tabs.value": "expert", "sel-trace.value": tid, "sel-expert.value": k,
                                             "sel-layer.value": 1, "sel-step.value": step}, "tabs.value")
    return out["expert-body"]["children"]


def test_expert_never_chosen_at_the_step_gets_no_noise_map(app_ctx):
    app, ctx = app_ctx
    body = expert_page(app, ctx, 2, 1)
    text = text_of(body)
    assert "expert 2 takes 0.00% of the tokens at layer 1, step 1" in text and "active at step 0 (100.0%)" in text
    assert "where (lift per token)" not in json.dumps(body)  # no map of noise
    assert "nan" not in text.lower().replace("nans", "")
    assert "expert 2 is never chosen at step 1" not in text  # step 1 -> nothing: it is the last step
    active = json.dumps(expert_page(app, ctx, 2, 0))
    assert "where (lift per token)" in active and '"zmax": 3' in active  # lift scale 0..K, not auto
    follows = text_of(expert_page(app, ctx, 0, 0))
    assert "expert 0 is never chosen at step 0" in follows and "nan" not in follows


def test_overview_lift_scale_reaches_K(app_ctx):
    app, ctx = app_ctx
    tid = ctx.registry.ids()[0]
    out = call(app, "overview-body.children", {"tabs.value": "overview", "sel-trace.value": tid, "sel-layer.value": 1,
                                               "sel-step.value": 0}, "tabs.value")
    figure = json.dumps(out)  # every heatmap of the overview: the small multiples of lift
    zmax = [int(part.split(",")[0].split("}")[0]) for part in figure.split('"zmax": ')[1:]]
    assert zmax and set(zmax) == {K}  # was capped at 2


def test_overview_is_one_row_per_layer_with_every_timestep_apart(app_ctx):
    """One heatmap row per layer holding every recursion step's shares (steps side by side, an empty
    column between them), one title per step and per layer, and timesteps under distinct labels,
    however close (two under one label would read as one)."""
    from dashboard.views.overview import share_figure, share_grid, timestep_labels

    app, ctx = app_ctx
    report = ctx.registry.report(ctx.registry.ids()[0])
    fig = share_figure(report)
    titles = sorted(a["text"] for a in fig.to_plotly_json()["layout"]["annotations"])
    steps = {s for layer in report["layers"].values() for s in layer["steps"]}
    assert titles == sorted([f"layer {layer}" for layer in report["layers"]] + [f"step {s}" for s in steps])
    grid, K = share_grid(report), report["trace"]["experts"]
    assert len(fig.data) == len(report["layers"])
    for row, (trace, lo) in enumerate(zip(fig.data, report["layers"].values())):
        lift = np.asarray(trace.z, float)  # (expert, column)
        for j, cell in enumerate(lo["steps"].values()):
            share = np.asarray(cell["share_by_timestep"]["share"], float)[grid.order].T  # the report's, by hand
            assert np.allclose(lift[:, j * grid.width: j * grid.width + len(grid.labels)], share * K)
            if j:
                assert np.isnan(lift[:, j * grid.width - 1]).all()  # the gap before this step
        assert np.allclose(np.asarray(trace.customdata, float), lift / K, equal_nan=True)  # the share on hover
        layer, step, t = grid.cell_at(row, trace.x[grid.width + 1])  # second step, second-noisiest timestep
        assert (layer, step) == (int(list(report["layers"])[row]), int(list(lo["steps"])[1]))
        assert t == int(np.argsort(-np.asarray(report["trace"]["timestep_values"]), kind="stable")[1])
        assert grid.cell_at(row, trace.x[grid.width - 1]) is None  # a gap
    assert timestep_labels(np.array([1000.0, 964.3, 928.6])) == ["1000", "964", "929"]
    assert timestep_labels(np.array([0.964, 0.958, 0.5])) == ["0.964", "0.958", "0.500"]


def test_overview_of_a_training_trace_runs_noise_to_clean(training_trace, tmp_path):
    """A training trace's overview is drawn from its timestep bins, noisiest bin first as the title
    says (the bins run up in the report), with each bin's shares in its column."""
    import shutil

    from dashboard.views.overview import share_figure, share_grid

    trace = Path(shutil.copy(training_trace, tmp_path / training_trace.name))  # the dashboard caches beside it
    ctx = make_context([str(trace)], permutations=0)
    try:
        report = ctx.registry.report(ctx.registry.ids()[0])
    finally:
        ctx.registry.close()
    assert report["trace"]["kind"] == "training"
    grid, fig = share_grid(report), share_figure(report)
    centres = [0.5 * (b["t_min"] + b["t_max"]) for b in report["timestep_bins"]]
    assert [centres[i] for i in grid.order] == sorted(centres, reverse=True)
    first = next(iter(next(iter(report["layers"].values()))["steps"].values()))
    noisiest = np.asarray(first["load_by_timestep_bin"][grid.order[0]]["share"], float)
    assert np.allclose(np.asarray(fig.data[0].customdata, float)[:, 0], noisiest)
