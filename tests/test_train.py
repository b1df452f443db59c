"""Training and sampling entry points on the tiny presets."""

import shutil

import numpy as np
import pytest
import torch

from rsr_model.__main__ import build_parser, main
from rsr_model.checkpoint import load_checkpoint
from rsr_model.flow import training_pair
from rsr_model.sample import generate, load_model
from rsr_model.tasks import get_task
from rsr_model.train import Trainer

from .conftest import one_error_line

FAST = ["--batch-size", "4", "--save-every", "1"]


def train_args(out, *extra):
    return build_parser().parse_args(["train", "--out", str(out), *FAST, *extra])


def weights(path):
    ck = load_checkpoint(path)
    return {**{f"base.{k}": v for k, v in ck["base_state"].items()},
            **{f"rsr.{k}": v for k, v in (ck["rsr_state"] or {}).items()}}


def test_training_lowers_loss_on_fixed_batch():
    task = get_task("tiny")
    torch.manual_seed(0)
    model = task.build_backbone().train()
    x0, cond = task.batch(np.random.default_rng(0), 8)
    xt, t, target = training_pair(x0, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.mse_loss(model(hidden_states=xt, timestep=t, **cond).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_batch_conditioning_does_not_depend_on_the_encoder_cache():
    """Exact resume needs a step's text encodings to be bitwise the same whether or not earlier
    steps warmed the encoder's cache (BLAS blocking depends on how many prompts miss it)."""
    warm, cold = get_task("tiny"), get_task("tiny")
    warm.batch(np.random.default_rng(0), 4)
    _, a = warm.batch(np.random.default_rng(1), 4)
    _, b = cold.batch(np.random.default_rng(1), 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


RECIPES = {"default": [],  # and the warm start with averaged experts, whose raw weights a resume needs
           "warm_ema": ["--warm-start", "band", "--warm-start-steps", "2", "--rsr-ema-decay", "0.9"]}


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_equals_uninterrupted_and_checkpoint_round_trip(tmp_path, recipe):
    full = tmp_path / "full.pt"
    trainer = Trainer(train_args(full, "--steps", "3", *RECIPES[recipe]))
    trainer.run()
    ck = load_checkpoint(full)
    assert ck["progress"] == {"base": 3, "rsr": 3} and ck["mode"] == "rsr"
    assert ck["text_encoder"]["name"] and ck["backbone"]["class"] == "SD3Transformer2DModel"

    # Interrupt a second run in the middle of each stage, resuming it each time.
    part = tmp_path / "part.pt"

    def crash_at(stage, step):
        def cb(info):
            if (info.stage, info.step) == (stage, step):
                raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        Trainer(train_args(part, "--steps", "3", *RECIPES[recipe]), callbacks=[crash_at("base", 2)]).run()
    assert load_checkpoint(part)["progress"] == {"base": 2, "rsr": 0}
    with pytest.raises(KeyboardInterrupt):  # right after the base stage's last checkpoint
        Trainer(train_args(part, "--steps", "3", "--resume"), callbacks=[crash_at("base", 3)]).run()
    assert load_checkpoint(part)["progress"] == {"base": 3, "rsr": 0}
    with pytest.raises(KeyboardInterrupt):
        Trainer(train_args(part, "--steps", "3", "--resume"), callbacks=[crash_at("rsr", 1)]).run()
    assert load_checkpoint(part)["progress"] == {"base": 3, "rsr": 1}
    Trainer(train_args(part, "--steps", "3", "--resume")).run()
    a, b = weights(full), weights(part)
    if recipe == "warm_ema":  # the raw experts went on training; the saved ones are their average
        assert not torch.equal(load_checkpoint(full)["rsr_train_state"]["2.experts.B"], a["rsr.2.experts.B"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The checkpoint alone rebuilds the model: same outputs as the trainer's in-memory model.
    task, model, rsr, _ = load_model(full)
    assert rsr is not None and rsr.config.mode == "rsr"
    x0, cond = task.batch(np.random.default_rng(1), 2)
    t = torch.tensor([500.0, 100.0])
    live = trainer.transformer.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(hidden_states=x0, timestep=t, **cond).sample,
                                   live(hidden_states=x0, timestep=t, **cond).sample, atol=0, rtol=0)


def test_sampling_is_deterministic_per_seed(tiny_ckpt, tmp_path):
    task, model, _, _ = load_model(tiny_ckpt)
    a = generate(task, model, ["a red circle", "two blue squares"], seeds=[0, 1], steps=3)
    b = generate(task, model, ["a red circle", "two blue squares"], seeds=[0, 1], steps=3)
    c = generate(task, model, ["a red circle"], seeds=[5], steps=3)
    assert torch.equal(a, b) and not torch.equal(a[:1], c)
    # the sampler's on_step sees each Euler step and changes nothing; its denoiser reproduces v
    seen = []

    def on_step(step):
        assert torch.equal(step.denoise(step.x, step.t, step.index), step.v)
        seen.append((step.index, step.sigma, step.x.shape))
    watched = generate(task, model, ["a red circle", "two blue squares"], seeds=[0, 1], steps=3, on_step=on_step)
    assert torch.equal(watched, a) and [i for i, _, _ in seen] == [0, 1, 2]
    assert seen[0][1] == 1.0 and seen[0][2] == a.shape and seen[0][1] > seen[1][1] > seen[2][1] > 0
    # one image does not depend on the rest of the batch
    torch.testing.assert_close(generate(task, model, ["two blue squares"], seeds=[1], steps=3), a[1:], atol=1e-5,
                               rtol=0)
    png = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(tiny_ckpt), "--prompt", "a red circle", "--steps", "2", "--out",
                 str(png)]) == 0
    assert png.stat().st_size > 0


def test_dit_digits_preset(tmp_path):
    out = tmp_path / "dit.pt"
    assert main(["train", "--preset", "dit-digits", "--out", str(out), *FAST, "--steps", "2", "--mode",
                 "no_recursion"]) == 0
    ck = load_checkpoint(out)
    assert ck["backbone"]["class"] == "DiTTransformer2DModel" and ck["mode"] == "no_recursion"
    png = tmp_path / "d.png"
    assert main(["sample", "--ckpt", str(out), "--label", "3", "--label", "7", "--steps", "2", "--out", str(png)]) == 0
    assert png.exists()


def _one_line_error(capsys, argv):
    capsys.readouterr()  # drop what earlier (successful) commands printed
    rc = main(argv)
    assert rc == 2
    return one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def made(tiny_ckpt, dit_base_ckpt, tmp_path_factory):
    """Checkpoints the bad-input cases refer to: a good tiny one, a truncated copy, a DiT one
    (copies of the session's, tests/conftest.py)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    good, dit = d / "good.pt", d / "dit.pt"
    shutil.copyfile(tiny_ckpt, good)
    shutil.copyfile(dit_base_ckpt, dit)
    (d / "corrupt.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return d


# (argv with {d}: the made checkpoints' folder, {t}: this test's tmp_path; fragment of the error)
BAD_INPUTS = [
    (["sample", "--ckpt", "{t}/missing.pt", "--prompt", "a", "--out", "{t}/x.png"], "not found"),
    (["sample", "--ckpt", "{d}/corrupt.pt", "--prompt", "a", "--out", "{t}/x.png"], "not a readable checkpoint"),
    (["train", "--out", "{t}/n.pt", "--steps", "1", "--experts", "0"], "experts"),
    (["train", "--out", "{t}/n.pt", "--steps", "1", "--latent-steps", "-1"], "steps"),
    (["train", "--out", "{t}/n.pt", "--steps", "1", "--rank", "0"], "rank"),
    (["train", "--out", "{t}/n.pt", "--target-layers", "6"], "beyond the model's depth"),
    (["train", "--out", "{d}/good.pt", "--steps", "1"], "exists"),  # never overwritten by accident
    (["train", "--stage", "rsr", "--base", "{d}/dit.pt", "--out", "{t}/r.pt"], "dit-digits"),
    (["sample", "--ckpt", "{d}/dit.pt", "--label", "12", "--out", "{t}/x.png"], "labels"),
]


@pytest.mark.parametrize("argv, fragment", BAD_INPUTS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_INPUTS])
def test_bad_inputs_give_one_line_errors(made, tmp_path, capsys, argv, fragment):
    before = {p.name: p.read_bytes() for p in made.iterdir()}
    assert fragment in _one_line_error(capsys, [a.format(d=made, t=tmp_path) for a in argv])
    assert list(tmp_path.iterdir()) == []  # no output written
    assert {p.name: p.read_bytes() for p in made.iterdir()} == before  # nothing existing changed


def test_resume_keeps_the_gate_learning_rate_of_the_run(tmp_path, capsys):
    out = tmp_path / "g.pt"

    def crash_in_rsr(info):
        if (info.stage, info.step) == ("rsr", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(train_args(out, "--steps", "2", "--gate-lr-scale", "10"), callbacks=[crash_in_rsr]).run()
    before = out.read_bytes()
    assert "differs from the run being resumed" in _one_line_error(
        capsys, ["train", "--out", str(out), *FAST, "--resume", "--gate-lr-scale", "3"])
    assert out.read_bytes() == before
    assert main(["train", "--out", str(out), *FAST, "--resume"]) == 0  # the run's own scale is kept
    groups = load_checkpoint(out)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])


def test_checkpoint_architecture_is_checked_not_only_its_preset_name(made):
    from rsr_model.checkpoint import CheckpointError
    from rsr_model.train import build_from_checkpoint

    with pytest.raises(CheckpointError, match="DiTTransformer2DModel"):
        build_from_checkpoint(get_task("tiny"), load_checkpoint(made / "dit.pt"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan.pt"
    msg = _one_line_error(capsys, ["train", "--out", str(out), *FAST, "--steps", "6", "--lr", "1e30", "--stage",
                                   "base"])
    assert "Last good checkpoint" in msg
    ck = load_checkpoint(out)  # still readable, at the last finite step
    assert 1 <= ck["progress"]["base"] < 6
    assert all(torch.isfinite(v).all() for v in ck["base_state"].values() if v.is_floating_point())


def test_a_run_saved_before_the_recipe_flags_resumes_as_it_was_trained(tmp_path):
    """Checkpoints written before --warm-start/--rsr-ema-decay existed resume without them, not with
    today's preset defaults (tiny's step-band warm start would not even fit their 4 experts)."""
    from rsr_model.checkpoint import save_checkpoint

    out = tmp_path / "old.pt"

    def crash_in_rsr(info):
        if (info.stage, info.step) == ("rsr", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(train_args(out, "--steps", "2", "--experts", "4", "--warm-start", "none"),
                callbacks=[crash_in_rsr]).run()
    ck = load_checkpoint(out)
    for name in ("warm_start", "warm_start_steps", "rsr_ema_decay"):
        del ck["args"][name]
    save_checkpoint(ck, out)
    trainer = Trainer(train_args(out, "--steps", "2", "--resume"))
    assert (trainer.args.warm_start, trainer.args.rsr_ema_decay) == ("none", 0.0)
    trainer.run()
    assert load_checkpoint(out)["progress"]["rsr"] == 2
