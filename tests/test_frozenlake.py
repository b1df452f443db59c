"""The FrozenLake navigation preset: data against gymnasium, teacher forcing, the gate choosing
at inference, held-out maps, map validation, and the commands end to end (real tiny models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_common.errors import UserError
from rsr_model.install import install_rsr
from rsr_model.tasks import get_task
from rsr_model.tasks.frozenlake import maps as lake
from rsr_model.tasks.frozenlake.judge import judge, make_plans
from rsr_model.tasks.frozenlake.model import FrozenLakeNet, decode, rollout

MAP = "SFFF/FHFH/FFFH/HFFG"


def small_model(task, **rsr_changes):
    torch.manual_seed(0)
    net = FrozenLakeNet(map_size=task.size, dim=32, heads=2, encoder_blocks=1, policy_hidden=32)
    cfg = task.default_rsr().replace(target_layers=[net.rsr_block], rank=4, gate_hidden=32, **rsr_changes)
    return net, install_rsr(net, cfg, freeze_base=False)


def test_renderer_agrees_with_the_environment():
    from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

    rng = np.random.default_rng(0)
    for seed in range(20):
        desc = lake.random_map(5, 0.7, seed)
        env = FrozenLakeEnv(desc=list(desc), is_slippery=False)
        state, _ = env.reset(seed=seed)
        for _ in range(12):
            tiles, agent = lake.read_cells(lake.render(desc, int(state)), len(desc))
            assert agent == state  # the agent is drawn where the environment says it is
            assert tiles == lake.drawn_tiles(desc)
            state, _, terminated, _, _ = env.step(int(rng.integers(4)))
            if terminated:
                break


def test_shortest_plans_reach_the_goal_safely():
    for seed in range(30):
        desc = lake.random_map(6, 0.6, seed)
        plan = lake.shortest_path(desc)
        states = lake.replay(desc, plan)
        assert states[-1] == lake.find(desc, "G")[0] and len(states) == len(plan) + 1
        assert not set(states) & set(lake.find(desc, "H"))
        (sr, sc), (gr, gc) = divmod(states[0], 6), divmod(states[-1], 6)
        assert len(plan) >= abs(sr - gr) + abs(sc - gc)
    # the symmetries put start and goal in every corner, so plans use all four actions
    assert {a for s in range(40) for a in lake.shortest_path(lake.random_map(4, 0.7, s))} == {0, 1, 2, 3}


def test_held_out_maps_are_disjoint_by_content():
    task = get_task("frozenlake")
    held_out = set(task.eval_maps)
    assert len(held_out) == task.n_eval
    rng = np.random.default_rng(0)
    drawn = [task.training_maps.draw(rng).desc for _ in range(400)]
    assert not held_out & set(drawn)
    # the filter is what keeps them apart: unfiltered draws of 4x4 maps do hit held-out contents
    unfiltered = {lake.random_map(4, task.frozen, int(s)) for s in np.random.default_rng(0).integers(0, 10**9, 400)}
    assert held_out & unfiltered


@pytest.mark.parametrize("bad, message", [
    ("SFF/FHF", "square"), ("SFFF/FXFH/FFFH/HFFG", "unknown tile"), ("FFFF/FHFH/FFFH/HFFG", "exactly one start"),
    ("SFFS/FHFH/FFFH/HFFG", "exactly one start"), ("SFFF/FHFH/FFFH/HFFF", "exactly one goal"),
    ("SFFF/FHFH/FFFH/HFHG", "not reachable"), ("", "empty")])
def test_every_bad_map_gets_its_error(bad, message):
    with pytest.raises(UserError, match=message):
        lake.parse_map(bad)


def test_teacher_forced_training_lowers_the_loss():
    task = get_task("frozenlake")
    net, rsr = small_model(task)
    frames, actions = task.padded([task.training_maps.draw(np.random.default_rng(s)) for s in range(4)])
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = task.training_loss(net, rsr, frames, {"actions": actions}, seed=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert task.last_parts["action"] < 1.0  # the gate learns the actions of these maps
    assert not rsr.hooks.active  # teacher forcing leaves no hook behind


def test_under_teacher_forcing_only_the_cross_entropy_trains_the_gate():
    task = get_task("frozenlake")
    net, rsr = small_model(task)
    frames, actions = task.padded([lake.episode(lake.parse_map(MAP))])
    net.train()
    plan = rollout(net, rsr, frames[:, 0], actions)
    ((decode(net, plan.latents) - frames) ** 2).mean().backward()  # the frame loss alone
    gate = rsr.layer(net.rsr_block).gate
    assert all(p.grad is None or not p.grad.any() for p in gate.parameters())
    assert rsr.layer(net.rsr_block).experts.B.grad.abs().sum() > 0


def test_at_inference_the_gate_not_the_label_chooses():
    task = get_task("frozenlake")
    net, rsr = small_model(task)
    frames, actions = task.padded([lake.episode(lake.parse_map(MAP))])
    task.training_loss(net, rsr, frames, {"actions": actions}, seed=0)  # a teacher-forced pass first
    layer = rsr.layer(net.rsr_block)
    assert lake.UP not in lake.shortest_path(lake.parse_map(MAP))
    with torch.no_grad():
        layer.gate.out.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 50.0]))  # a gate that always says "up"
    plan = make_plans(task, net, rsr, [lake.parse_map(MAP)])[0]
    assert plan.actions == [lake.UP] * rsr.config.steps  # labels would say down/right
    with torch.no_grad():
        layer.gate.out.bias.zero_()
    net.eval()
    with torch.no_grad():
        roll = rollout(net, rsr, frames[:, 0])
    votes = roll.logits.argmax(-1)  # (1, L, N): every token's own choice
    assert torch.equal(roll.actions, torch.nn.functional.one_hot(votes, 4).sum(2).argmax(-1))  # the majority
    assert torch.equal((votes == roll.actions[..., None]).float().mean(-1), roll.agreement)


def test_baseline_without_routing_plans_with_its_policy():
    task = get_task("frozenlake")
    net, rsr = small_model(task, mode="no_modulation")
    assert rsr.layer(net.rsr_block).gate is None
    frames, actions = task.padded([lake.episode(lake.parse_map(MAP))])
    loss = task.training_loss(net, rsr, frames, {"actions": actions}, seed=0)
    loss.backward()
    assert net.policy.out.weight.grad is not None and net.action_embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        net.policy.out.bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))
    plan = make_plans(task, net, rsr, [lake.parse_map(MAP)])[0]
    assert plan.actions == [lake.DOWN] * rsr.config.steps


def test_judging_a_plan_twice():
    desc = lake.parse_map(MAP)
    ep = lake.episode(desc)
    from rsr_model.tasks.frozenlake.judge import Plan

    L = len(ep.actions) + 1
    perfect = Plan(map=desc, actions=ep.actions + [0], length=len(ep.actions), frames=ep.frames,
                   cells=ep.states, agreement=[1.0] * L, votes=np.zeros((L, 16), int), probs=np.zeros((L, 16, 4)))
    j = judge(perfect)
    assert j.success_frames and j.success_env and all(j.actions_match) and all(j.frames_correct)
    # a diagonal jump in the frames, and a replay that walks into the hole at (1, 1)
    frames = ep.frames.copy()
    frames[1] = lake.render(desc, 5)
    bad = Plan(map=desc, actions=[lake.RIGHT, lake.DOWN] + [0] * (L - 2), length=2, frames=frames,
               cells=[0, 5, 5] + [5] * (L - 3), agreement=[1.0] * L, votes=perfect.votes, probs=perfect.probs)
    j = judge(bad)
    assert j.diagonal_moves == 1 and j.impossible_moves == 1 and j.fell_in_hole and not j.success_env


def test_train_sample_and_record_commands(tmp_path, capsys):
    from probes.record import main as record_main
    from rsr_model.__main__ import main
    from traces import open_trace

    ckpt, png, maps, trace = tmp_path / "fl.pt", tmp_path / "plan.png", tmp_path / "maps.txt", tmp_path / "fl.h5"
    assert main(["train", "--preset", "frozenlake", "--steps", "2", "--batch-size", "4", "--out", str(ckpt)]) == 0
    assert main(["sample", "--ckpt", str(ckpt), "--map", MAP, "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.is_file() and MAP in out and "environment:" in out
    for bad in ("SFF/FHF", "SFFF/FHFH/FFFH/HFHG", "SFFFF/FFFFF/FFFFF/FFFFF/FFFFG"):
        capsys.readouterr()
        assert main(["sample", "--ckpt", str(ckpt), "--map", bad, "--out", str(png), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")
    # the checkpoint's task decides which item flags apply; another task's are refused, not ignored
    for command, argv, message in [
            (main, ["sample", "--ckpt", str(ckpt), "--prompt", "a lake", "--out", str(tmp_path / "x.png")],
             "takes --map, not --prompt"),
            (record_main, ["--ckpt", str(ckpt), "--prompts", "a lake", "--out", str(trace)],
             "takes --maps, not --prompts"),
            (record_main, ["--ckpt", str(ckpt), "--out", str(trace)], "give at least one --prompts or --maps")]:
        capsys.readouterr()
        assert command(argv) == 2
        assert message in capsys.readouterr().err
    assert not trace.exists() and not (tmp_path / "x.png").exists()
    maps.write_text(MAP + "\nSFFH/FFFF/HFFF/HHFG\n")
    assert record_main(["--ckpt", str(ckpt), "--maps", str(maps), "--out", str(trace), "--probs"]) == 0
    with open_trace(trace) as tr:
        L = get_task("frozenlake").horizon + 1
        assert tr.read("/routing/expert").shape == (2, 1, 1, 1, L, 16)
        assert tr.read("/decoded/step").shape == (2, 1, 1, 1, L, 16, 16, 3)
        assert "action_step_0" in json.loads(tr.read("/samples/scene")[0])["attributes"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three real frozenlake checkpoints (2 steps each): RSR seeds 0 and 1, the baseline seed 0;
    the RSR seed-0 run also writes a training trace."""
    from rsr_model.__main__ import main

    d = tmp_path_factory.mktemp("planning")
    paths = {}
    for mode, seed in (("rsr", 0), ("rsr", 1), ("no_modulation", 0)):
        paths[mode, seed] = d / f"{mode}{seed}.pt"
        trace = ["--trace", str(d / "train.h5"), "--trace-every", "1", "--trace-probs"] if (mode, seed) == ("rsr",
                                                                                                            0) else []
        assert main(["train", "--preset", "frozenlake", "--mode", mode, "--seed", str(seed), "--steps", "2",
                     "--batch-size", "4", "--out", str(paths[mode, seed]), *trace]) == 0
    return d, paths


def test_planning_figures_collect_checkpoints_by_size_budget_and_mode(trained, capsys):
    from rsr_model.__main__ import main
    from rsr_model.sample import load_model
    from rsr_model.tasks.frozenlake.judge import summarize

    d, paths = trained
    out = d / "evaluate"
    longer = d / "rsr0-3steps.pt"  # another budget: its own row, never averaged with the 2-step ones
    assert main(["train", "--preset", "frozenlake", "--seed", "0", "--steps", "3", "--batch-size", "4",
                 "--out", str(longer)]) == 0
    assert main(["evaluate", "--planning", *map(str, paths.values()), str(longer), "--out", str(out)]) == 0
    result = json.loads((out / "planning.json").read_text())
    assert [(r["size"], r["steps"], r["mode"], r["checkpoints"]) for r in result["rows"]] == [
        ("4x4", 2, "rsr", 2), ("4x4", 2, "no_modulation", 1), ("4x4", 3, "rsr", 1)]
    # every figure is the judge's own on the same held-out maps, averaged over the row's checkpoints
    direct = []
    for seed in (0, 1):
        task, net, rsr, _ = load_model(paths["rsr", seed])
        plans = make_plans(task, net, rsr, task.eval_maps[:result["maps"]])
        direct.append(summarize([judge(p) for p in plans], plans))
    row = result["rows"][0]
    for key in ("success_env", "success_frames", "action_accuracy", "frame_accuracy"):
        assert row[key]["mean"] == pytest.approx(np.mean([x[key] for x in direct]))
        assert row[key]["std"] == pytest.approx(np.std([x[key] for x in direct], ddof=1))
    assert row["failures"]["hole"] == pytest.approx(np.mean([x["failures"]["hole"] for x in direct]))
    assert list(result["rsr_vs_shared"]) == ["4x4, 2 steps"]  # the 3-step RSR has no baseline of its budget
    test = result["rsr_vs_shared"]["4x4, 2 steps"]  # paired by seed (only seed 0 has both) and map
    runs = {(r["mode"], r["seed"]): r["success_per_map"] for r in result["runs"] if r["steps"] == 2}
    a, b = np.array(runs["rsr", 0]), np.array(runs["no_modulation", 0])
    assert test["seeds"] == [0] and test["pairs"] == result["maps"] == len(a)
    assert (test["only_first"], test["only_second"]) == ((a & ~b).sum(), (~a & b).sum())
    assert a.mean() == pytest.approx(direct[0]["success_env"])
    assert test["difference_per_seed"] == [pytest.approx(a.mean() - b.mean())]
    md = (out / "planning.md").read_text()
    assert md.splitlines()[2].startswith("| 4x4 | 2 | rsr | 2 |") and "holes" in md.splitlines()[0]
    assert "RSR − shared module (4x4, 2 steps, seeds [0])" in md and "per seed" in md
    assert main(["evaluate", "--planning", str(paths["rsr", 0]), "--out", str(out)]) == 2  # never overwritten


def test_plan_traces_reach_the_probes_and_the_dashboard(trained, tmp_path):
    """A recorded plan gets the probes' MI(expert; true action) per latent step, and the
    dashboard's filmstrip, routing map and training views render it (training trace included)."""
    from dashboard.app import create_app
    from dashboard.common import make_context
    from dashboard.data import trace_id
    from probes.record import main as record_main
    from probes.report import main as report_main
    from traces import open_trace

    from .test_dashboard import ROUTING, call, text_of

    d, paths = trained
    served = tmp_path / "served"
    served.mkdir()
    (tmp_path / "maps.txt").write_text("\n".join(lake.map_text(m) for m in get_task("frozenlake").eval_maps[:6]))
    trace = served / "plans.h5"
    assert record_main(["--ckpt", str(paths["rsr", 0]), "--maps", str(tmp_path / "maps.txt"), "--out", str(trace),
                        "--probs"]) == 0
    assert report_main([str(trace), "--json", str(tmp_path / "r.json"), "--permutations", "9", "--no-probes"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    step0 = report["layers"][str(get_task("frozenlake").encoder_blocks)]["steps"]["0"]["mi"]
    assert "action_step_0" in step0 and step0["action_step_0"]["mi"] >= 0

    with open_trace(d / "train.h5") as tr:  # the training trace: one event per map of each batch
        L = get_task("frozenlake").horizon + 1
        assert tr.read("/routing/expert").shape == (8, 1, L, 16)
    import shutil

    shutil.copy(d / "train.h5", served / "train.h5")
    app = create_app(make_context([str(served)], permutations=9))
    sel = {"sel-trace.value": trace_id(trace), "sel-sample.value": 0, "sel-branch.value": "cond",
           "sel-t.value": 0, "sel-layer.value": 2, "sel-step.value": 3, "sel-expert.value": 0,
           "film-overlay.value": ["on"], "flow-bin.value": "all"}
    for view, output in [("filmstrip", "filmstrip-body.children"), ("overview", "overview-body.children"),
                         ("flow", "flow-body.children")]:
        body = call(app, output, {**sel, "tabs.value": view}, "tabs.value")[output.split(".")[0]]["children"]
        assert "msg-error" not in json.dumps(body), (view, text_of(body))
    film = json.dumps(call(app, "filmstrip-body.children", {**sel, "tabs.value": "filmstrip"})["filmstrip-body"])
    assert film.count("data:image/png;base64") >= L  # a decoded frame per latent step
    plan = json.loads(open_trace(trace).read("/samples/scene")[0])
    assert f"shortest plan {' '.join(plan['shortest_plan'])}" in film  # captioned as a plan, not a diffusion
    assert plan["plan_length"] == L - 1 or "after stop" in film
    routing = call(app, ROUTING, {**sel, "tabs.value": "routing"}, "tabs.value")
    heat = routing["routing-map"]["figure"]["data"][0]
    z = heat["z"]  # plotly sends arrays as {"dtype", "bdata", "shape"}
    shape = tuple(int(n) for n in z["shape"].split(",")) if isinstance(z, dict) else np.shape(z)
    assert shape == (4, 4)  # the map's cells, one token each
    training = call(app, "training-body.children", {**sel, "sel-trace.value": trace_id(served / "train.h5"),
                                                    "tabs.value": "training"})["training-body"]["children"]
    assert "msg-error" not in json.dumps(training) and "needs a training trace" not in text_of(training)
