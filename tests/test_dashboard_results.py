"""The dashboard's Results tab on real `python -m rsr_model evaluate` outputs (quick budgets):
figures carry the JSON's numbers and spreads, a broken file is one line beside the others,
the tab works with no trace served, and the command line refuses a missing --results folder."""

import json
import shutil

import numpy as np
import pytest

from dashboard.__main__ import main as dashboard_main
from dashboard.app import create_app
from dashboard.common import make_context
from dashboard.views import results as res
from rsr_model.__main__ import main as rsr_main

from .conftest import one_error_line, train
from .dashboard_page import call, click, console_errors, selection, text_of, wait_for


@pytest.fixture(scope="module")
def results(quick_table, quick_class_conditioned, tmp_path_factory):
    """Every result kind, written by the real commands: the quick ablation table (middle target,
    2 seeds) and the quick class-conditioned table (the session's runs, tests/conftest.py, whose
    JSON and Markdown are copied here), a 3-scene scorer check and planning figures of two 2-step
    FrozenLake checkpoints."""
    d = tmp_path_factory.mktemp("results")
    out = d / "evaluate"
    out.mkdir()
    for shared in (quick_table.out, quick_class_conditioned.out):
        for result in (*shared.glob("*.json"), *shared.glob("*.md")):
            shutil.copyfile(result, out / result.name)
    assert rsr_main(["evaluate", "--scorer-check", "--scenes", "3", "--out", str(out)]) == 0
    lakes = [d / f"lake_s{seed}.pt" for seed in (0, 1)]
    for seed, ckpt in enumerate(lakes):
        assert train(ckpt, "--preset", "frozenlake", "--seed", seed) == 0
    assert rsr_main(["evaluate", "--planning", *map(str, lakes), "--out", str(out)]) == 0
    return out


def load(folder, name):
    return res.load_result(folder / f"{name}.json", res.KINDS[name])


def test_table_figures_carry_the_means_spreads_and_test(results):
    table = load(results, "table")
    rows = res.trained_rows(table)
    assert len(rows) == len(table["rows"]) - 1 == 4  # the base is a line, not a bar
    bars = res.table_overall_figure(table).data[0]
    assert list(bars.x) == [f"{r['target']} · {r['mode']}" for r in rows]
    assert list(bars.y) == [r["scores"]["overall"]["mean"] for r in rows]
    assert list(bars.error_y.array) == [r["scores"]["overall"]["std"] for r in rows]
    base_line = res.table_overall_figure(table).layout.shapes[0]
    assert base_line.y0 == base_line.y1 == pytest.approx(100 * table["base_scores"]["overall"])
    # quality beside specialization: one point per gated checkpoint (no_recursion and rsr, 2 seeds each)
    scatter = res.specialization_figure(table)
    value_traces = [t for t in scatter.data if t.xaxis == "x"]
    assert [t.name for t in value_traces] == ["middle · no_recursion", "middle · rsr"]
    for trace in value_traces:
        row = next(r for r in rows if f"{r['target']} · {r['mode']}" == trace.name)
        runs = [r for r in table["runs"] if (r["target"], r["mode"]) == (row["target"], row["mode"])]
        assert list(trace.x) == [r["routing"]["routing_value"] for r in runs]
        assert np.mean(trace.y) == pytest.approx(row["scores"]["overall"]["mean"])  # per-seed scores average to the row
        low, _ = runs[0]["routing"]["routing_value_ci95"]
        assert trace.error_x.arrayminus[0] == pytest.approx(runs[0]["routing"]["routing_value"] - low)
    evidence = " ".join(res.table_evidence(table))
    test = table["rsr_vs_sft"]["middle"]
    assert f"{test['only_first']} right only under RSR, {test['only_second']} only under SFT" in evidence
    assert f"McNemar p = {test['p_value']:.3g}" in evidence and f"{test['pairs']} paired images" in evidence


def test_other_kinds_plot_their_rows(results):
    planning = load(results, "planning")
    fig = res.planning_figure(planning)
    from evaluation.planning import FIGURES

    panel = f"x{list(FIGURES).index('action_accuracy') + 1}"
    action = next(t for t in fig.data if t.xaxis == panel)
    row = planning["rows"][0]
    assert "no paired test" in " ".join(res.planning_evidence(planning))  # two RSR seeds, no baseline
    assert list(action.x) == ["4x4, 2 steps"] and action.y[0] == row["action_accuracy"]["mean"]
    assert action.error_y.array[0] == row["action_accuracy"]["std"] > 0  # 2 checkpoints of 2 training steps differ

    digits = load(results, "class_conditioned")
    fig = res.class_conditioned_figure(digits)
    assert [a.text for a in fig.layout.annotations][:5] == ["fd", "sfd", "is", "precision", "recall"]
    fd_bars, fd_seeds = fig.data[0], fig.data[1]
    assert list(fd_bars.y) == [row["fd"] for row in digits["rows"].values()]
    assert len(fd_seeds.y) == 3 * len(digits["budget"]["seeds"])  # each seed of the three trained rows
    assert "not a floor" in " ".join(res.class_conditioned_evidence(digits))  # FD is biased on 297 real images

    check = load(results, "scorer_check")
    accuracy = res.scorer_check_figure(check).data[0]
    assert list(accuracy.x) == ["single_object", "two_object", "counting", "colors", "color_attr", "position"]
    assert list(accuracy.y) == [100 * check["cells"][f"24/{c}"]["accuracy"] for c in accuracy.x]


def test_tables_rebuilt_from_the_json_equal_the_written_markdown(results):
    for name, kind in res.KINDS.items():
        if name == "shift":  # made by evaluate --shift: tests/test_shift_eval.py checks the same equality on its own
            continue
        assert kind.markdown(load(results, name)).strip() == (results / f"{name}.md").read_text().strip(), name


def test_a_broken_file_is_one_line_and_the_rest_render(results, tmp_path):
    folder = tmp_path / "evaluate"
    shutil.copytree(results, folder, ignore=shutil.ignore_patterns("checkpoints", "*.pt"))
    (folder / "planning.json").write_text('{"rows": [')  # truncated
    (folder / "old").mkdir()
    (folder / "old" / "table.json").write_text(json.dumps({"rows": [], "budget": {}}))  # not a table's keys
    (folder / "class_conditioned.md").unlink()  # rebuilt from the JSON
    no_spread = json.loads((results / "table.json").read_text())
    del no_spread["rows"][2]["scores"]["overall"]["std"]
    (folder / "older").mkdir()
    (folder / "older" / "table.json").write_text(json.dumps(no_spread))
    page = json.loads(json.dumps(res.results_page(folder), default=lambda c: c.to_plotly_json()))
    errors = [text_of(c) for c in page if "msg-error" in json.dumps(c)]
    assert len(errors) == 3
    assert errors[0].startswith("old/table.json: lacks rsr_vs_sft, base_scores") and "evaluate --table" in errors[0]
    assert errors[1] == "older/table.json: row 2 of 'rows' lacks scores.overall.std"
    assert errors[2].startswith("planning.json: not a readable JSON file")
    text = text_of(page)
    for kind in ("table", "class_conditioned", "scorer_check"):
        assert res.KINDS[kind].title in text
    assert "| real test split |" in text and "McNemar p =" in text
    assert json.dumps(page).count('"type": "Graph"') == 3 + 1 + 1  # table: overall, categories, scatter


def test_command_line_and_defaults(results, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert dashboard_main(["--results", str(tmp_path / "missing")]) == 2
    assert "--results" in one_error_line(capsys.readouterr().err)
    assert make_context([str(tmp_path)]).results is None
    page = text_of(json.loads(json.dumps(res.results_page(None), default=lambda c: c.to_plotly_json())))
    assert res.MAKE_THEM in page
    (tmp_path / "runs" / "evaluate").mkdir(parents=True)  # the default folder, once it exists
    ctx = make_context([str(tmp_path)])
    assert str(ctx.results) == "runs/evaluate"
    assert res.MAKE_THEM in text_of(json.loads(json.dumps(res.results_page(ctx.results),
                                                          default=lambda c: c.to_plotly_json())))


@pytest.fixture(scope="module")
def app_ctx(results, tmp_path_factory):
    """The app serving no trace at all, only the results folder (what `browser` serves here)."""
    ctx = make_context([str(tmp_path_factory.mktemp("no_traces"))], results=results)
    assert not ctx.registry.entries
    return create_app(ctx), ctx


def test_results_tab_without_traces(app_ctx):
    app, _ = app_ctx
    sel = selection(app, "?view=results")
    assert sel["tabs"] == "results" and sel["sel-trace"] is None
    assert selection(app)["tabs"] == "results"  # the page opens on the only tab with something to show
    body = call(app, "results-body.children", {"tabs.value": "results"}, "tabs.value")["results-body"]["children"]
    assert "msg-error" not in json.dumps(body)
    assert "Ablation table" in text_of(body) and "Scorer check" in text_of(body)


def test_browser_results_tab(browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def text(d, css: str) -> str:
        """The element's text, or '' while a callback still replaces it."""
        try:
            return " ".join(e.text for e in d.find_elements(By.CSS_SELECTOR, css))
        except StaleElementReferenceException:
            return ""

    driver, url, _ = browser
    driver.get(f"{url}/?view=overview")
    click(driver, "//*[@id='tabs']//*[text()='Results']")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#result-table .js-plotly-plot .bars"))
    wait_for(driver, lambda d: all(word in text(d, "#result-table table") for word in ("no_recursion", "Overall")))
    assert "McNemar p =" in text(driver, "#result-table")
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result .js-plotly-plot")) == 3 + 1 + 1 + 1)
    assert "view=results" in driver.current_url
    assert not console_errors(driver)
    driver.get(url)  # no trace served: the page opens on Results
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#result-table .js-plotly-plot .bars"))
