"""Recording traces from the tiny model: the trace holds what the hooks saw."""

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from probes.record import main as record_main
from rsr_model.hooks import hook_name
from rsr_model.recorders import ABLATED, SamplingRecorder, Selection, sample_table
from rsr_model.sample import load_model
from traces import SamplingWriter, TraceError, open_trace

from .conftest import one_error_line, train, wait_until

PROMPT = "two red circles left of a blue square"


@pytest.fixture
def ckpt(tiny_ckpt):
    """The session's tiny checkpoint (tests/conftest.py), shared with other files."""
    return tiny_ckpt


def _record(ckpt, out, *extra):
    return record_main(["--ckpt", str(ckpt), "--prompts", PROMPT, "--out", str(out), "--steps", "4", *extra])


def test_trace_matches_what_the_hooks_saw(ckpt, tmp_path):
    task, transformer, rsr, _ = load_model(ckpt)
    sel = Selection(probs=True, latent_tokens=8)
    rec = SamplingRecorder(task, transformer, rsr, sel, steps=3, guidance=2.0)
    items, seeds = [PROMPT, "a green triangle", "three blue circles"], [0, 1, 2]
    writer = SamplingWriter(tmp_path / "t.h5", rec.layout(), sample_table(task, items, seeds))
    with rsr.hooks.cache(["*.expert", "*.probs", "*.latent"]) as seen:
        rec.record(writer, items, seeds, batch_size=2)
    writer.close()
    with open_trace(tmp_path / "t.h5") as tr:
        assert tr.complete and tr.n_samples == 3
        expert, prob, latents = tr.routing(), tr.prob(), tr.latents()
        counts = tr.counts()
        branches = list(tr.coords["branch"])
        lat_idx = tr.coords["stored_token"]
    layer = rsr.layer_indices[0]
    L = rsr.config.steps
    for s in range(L):
        calls = seen[hook_name(layer, "expert", s)]
        pcalls = seen[hook_name(layer, "probs", s)]
        lcalls = seen[hook_name(layer, "latent", s)]
        assert len(calls) == 2 * 3  # two batches x three sampler steps
        for call, (ctx, e) in enumerate(calls):
            batch, t = divmod(call, 3)
            rows = slice(2 * batch, min(2 * batch + 2, 3))
            B = rows.stop - rows.start
            for b, name in enumerate(("uncond", "cond")):
                got = expert[rows, branches.index(name), t, 0, s]
                want = e[b * B:(b + 1) * B].numpy()
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(prob[rows, branches.index(name), t, 0, s],
                                              pcalls[call][1][b * B:(b + 1) * B].to(torch.float16).numpy())
                np.testing.assert_array_equal(latents[rows, branches.index(name), t, 0, s],
                                              lcalls[call][1][b * B:(b + 1) * B][:, lat_idx].to(torch.float16).numpy())
    # counts agree with the ids and cover every token
    K = rsr.config.experts
    assert (counts.sum(-1) == expert.shape[-1]).all()
    np.testing.assert_array_equal(counts, (expert[..., None] == np.arange(K)).sum(-2))


def test_selection_stores_exactly_what_was_asked(ckpt, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    assert _record(ckpt, full, "--num-samples", "2") == 0
    assert _record(ckpt, part, "--num-samples", "2", "--rsr-steps", "0,2", "--timesteps", "1,3",
                   "--token-stride", "4", "--branches", "cond") == 0
    with open_trace(full) as f, open_trace(part) as p:
        assert list(p.coords["step"]) == [0, 2] and list(p.coords["timestep"]) == [1, 3]
        n = f.coords["token"].size
        assert list(p.coords["token"]) == list(range(0, n, 4)) and list(p.coords["branch"]) == ["cond"]
        assert p.routing().shape == (2, 1, 2, 1, 2, len(range(0, n, 4)))
        ci = list(f.coords["branch"]).index("cond")
        want = f.routing()[:, ci:ci + 1][:, :, [1, 3]][:, :, :, :, [0, 2]][..., ::4]
        np.testing.assert_array_equal(p.routing(), want)
        # counts always cover all tokens, whatever the stride
        np.testing.assert_array_equal(p.counts(), f.counts()[:, ci:ci + 1][:, :, [1, 3]][:, :, :, :, [0, 2]])
        assert not p.has("/routing/prob") and not p.has("/latents/h")
        np.testing.assert_array_equal(p.final(), f.final())  # same seeds, same images


def test_size_estimate_and_max_gb(ckpt, tmp_path, capsys):
    out = tmp_path / "big.h5"
    assert _record(ckpt, out, "--num-samples", "6", "--steps", "10", "--probs", "--latent-tokens", "16") == 0
    err = capsys.readouterr().err
    expected = float(err.split("expected ")[1].split(" MiB")[0]) * 2**20
    assert abs(out.stat().st_size - expected) / out.stat().st_size < 0.2, (out.stat().st_size, expected)
    decoded = tmp_path / "decoded.h5"
    assert _record(ckpt, decoded, "--decode", "--latent-tokens", "16", "--latent-dim", "8") == 0
    with open_trace(decoded) as tr:
        assert tr.decoded().shape[3:5] == (1, 3) and tr.decoded().max() > 0
        assert tr.latents().shape[-1] == 8 and tr.dataset("/latents/projection").shape == (128, 8)
        # exiting at the last recursion step is the normal forward: its decode is this step's x0
        assert tr.decoded().shape[:5] == (1, 1, 4, 1, 3) and tr.decoded().shape[5:] == tr.final().shape[1:]
    refused = tmp_path / "refused.h5"
    assert _record(ckpt, refused, "--max-gb", "1e-6") == 2
    assert "exceeds --max-gb" in capsys.readouterr().err and not refused.exists()


def test_interventions_change_routing_and_are_recorded(ckpt, tmp_path):
    forced = tmp_path / "forced.h5"
    assert _record(ckpt, forced, "--force-expert", "1", "--at-step", "0", "--region", "0:4,0:8") == 0
    with open_trace(forced) as tr:
        h, w = tr.attrs["token_grid"]
        e = tr.routing()  # (1, branch, t, layer, step, h*w)
        grid = e.reshape(*e.shape[:-1], h, w)
        assert (grid[..., 0, :4, :8] == 1).all()
        assert not (grid[..., 0, 4:, :] == 1).all()  # outside the region the gate still chooses
        (applied,) = tr.attrs["interventions"]
        changed = applied.pop("tokens_changed")  # decisions it changed: at most 4 timesteps x 2 branches x 4x8 tokens
        assert applied == {"kind": "force", "expert": 1, "layers": None, "step": 0, "rows": [0, 4], "cols": [0, 8],
                           "t_min": None, "t_max": None}
        assert 0 < changed <= 4 * 2 * 32  # tokens the gate already sent to expert 1 are not changes
    ablated = tmp_path / "ablated.h5"
    assert _record(ckpt, ablated, "--ablate-expert", "0", "--at-step", "1") == 0
    with open_trace(ablated) as tr:
        e = tr.routing()
        assert not (e[..., 1, :] == 0).any() and (e[..., 1, :] == ABLATED).any()
        assert (e[..., 0, :] == 0).any()  # other steps untouched


def test_bad_cli_input(ckpt, tmp_path, capsys):
    cases = [
        ["--ckpt", str(tmp_path / "none.pt"), "--prompts", "x"],
        ["--ckpt", str(ckpt), "--prompts", str(tmp_path / "missing.txt")],
        ["--ckpt", str(ckpt), "--prompts", "x", "--layers", "5"],
        ["--ckpt", str(ckpt), "--prompts", "x", "--rsr-steps", "7"],
        ["--ckpt", str(ckpt), "--prompts", "x", "--force-expert", "9"],
        ["--ckpt", str(ckpt), "--prompts", "x", "--force-expert", "1", "--region", "bogus"],
        ["--ckpt", str(ckpt), "--prompts", "x", "--num-samples", "0"],
        ["--ckpt", str(ckpt), "--prompts", "x", "--timesteps", "a,b"],
    ]
    for argv in cases:
        out = tmp_path / "o.h5"
        capsys.readouterr()
        assert record_main([*argv, "--out", str(out), "--steps", "2"]) == 2, argv
        one_error_line(capsys.readouterr().err)
        assert not out.exists()


def test_sigkill_mid_recording_leaves_flushed_steps_readable(ckpt, tmp_path):
    out = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-m", "probes.record", "--ckpt", str(ckpt), "--prompts", PROMPT,
                             "--num-samples", "4", "--batch-size", "1", "--steps", "40", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The recorder announces no flushed step (its writes run in a background thread), so
        # watch the file; fail here, not later, if the steps never come or the run ends first.
        wait_until(lambda: proc.poll() is not None or _steps_written(out) >= 3, timeout=120,
                   waiting_for=f"3 flushed steps in {out}")
        assert proc.poll() is None, f"the recording ended (exit {proc.returncode}) before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with open_trace(out) as tr:
        assert not tr.complete
        written = tr.written.astype(bool)  # (sample, timestep)
        assert written.sum() >= 3 and not written.all()
        e = np.moveaxis(tr.routing(), 2, 1)  # (sample, timestep, branch, layer, step, token)
        K = tr.coords["expert"].size
        assert (e[written] < K).all()  # every flushed step is readable and valid
        assert (e[~written] == 255).all()  # the rest reads as unwritten


def _steps_written(path) -> int:
    """(sample, timestep) cells flushed so far; 0 while the file is not yet a readable trace."""
    try:
        with open_trace(path) as tr:
            return int(tr.written.sum())
    except (TraceError, FileNotFoundError):
        return 0


def test_model_side_never_imports_probes():
    """Data flow one way: the training command and the recorders work without the probes package."""
    code = ("import sys, rsr_model.__main__, rsr_model.recorders, rsr_model.sample; "
            "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] == 'probes') != [])")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_training_trace_flag(training_trace, tmp_path):
    trace = training_trace  # 4 steps of batch 3, routing with probabilities on steps 2 and 4
    with open_trace(trace) as tr:
        assert tr.kind == "training" and tr.complete
        ev, logs = tr.events(), tr.train()
        assert sorted(set(ev["step"])) == [2, 4] and len(ev["step"]) == 2 * 3  # batch of 3 on steps 2 and 4
        assert list(logs["step"]) == [1, 2, 3, 4] and np.isfinite(logs["loss"]).all()
        e, p = tr.routing(), tr.prob()
        K = tr.coords["expert"].size
        assert e.shape[0] == 6 and (e < K).all()
        np.testing.assert_allclose(p.astype(np.float32).sum(-1), 1.0, atol=1e-2)
        assert ((ev["timestep"] > 0) & (ev["timestep"] < 1000)).all()
    # an existing trace is not overwritten by a new run
    assert train(tmp_path / "n.pt", "--trace", trace, steps=1) == 2


def test_two_rank_recording_joins_into_one_trace(ckpt, tmp_path):
    from traces.join import main as join_main

    whole = tmp_path / "whole.h5"
    assert _record(ckpt, whole, "--num-samples", "3") == 0
    ranks = [tmp_path / f"r{r}.h5" for r in range(2)]
    for r, path in enumerate(ranks):
        assert _record(ckpt, path, "--num-samples", "3", "--rank", str(r), "--world-size", "2") == 0
    joined = tmp_path / "joined.h5"
    assert join_main([str(joined), *map(str, ranks)]) == 0
    with open_trace(whole) as w, open_trace(joined) as j:
        assert list(j.coords["sample"]) == [0, 2, 1]  # rank 0 holds samples 0 and 2, rank 1 sample 1
        np.testing.assert_array_equal(j.routing()[[0, 2, 1]], w.routing())
        np.testing.assert_array_equal(j.final()[[0, 2, 1]], w.final())


def test_intervention_and_output_errors_are_one_line(ckpt, tmp_path, capsys):
    from probes.causal import main as causal_main
    from traces.join import main as join_main

    out = tmp_path / "o.h5"
    for argv in (["--force-expert", "1", "--at-step", "9"], ["--ablate-expert", "0", "--at-layers", "5"]):
        capsys.readouterr()
        assert _record(ckpt, out, *argv) == 2
        one_error_line(capsys.readouterr().err)
        assert not out.exists()
    out.write_text("")  # a file where --json expects a folder
    for argv in (["--force-expert", "1", "--at-step", "9"], ["--ablate-expert", "1", "--json", str(out / "x.json")]):
        capsys.readouterr()
        assert causal_main(["--ckpt", str(ckpt), "--prompts", PROMPT, "--steps", "2", *argv]) == 2
        one_error_line(capsys.readouterr().err)
    capsys.readouterr()
    assert join_main(["--bogus"]) == 2
    one_error_line(capsys.readouterr().err)
