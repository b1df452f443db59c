"""A plain verdict per layer and recursion step: is the routing specialization, or noise?

Routing statistics describe which expert the argmax picked; an argmax over a flat gate still
picks one, and on millions of tokens a tiny MI is "significant". The verdict weighs the evidence
a researcher would. This module is the one place a verdict is computed: `probes.report`, the
dashboard (which runs `probes.report` with the routing value it finds for the trace's checkpoint)
and `evaluate --table` all call `step_verdict` / `add_verdicts`.

With a routing value (`probes.routing_value`, the scope of that layer and step) the value decides,
judged by its 95% interval (over held-out sets, samples and random draws):

    harmful        the interval lies below 0 against the per-image null AND the per-token null (schema
                   2): the gate's routing is worse than any random routing with the same load. A claim
                   in either direction must hold against both nulls: a gate that mixes experts inside
                   an image (position routing) can lose to the per-image null by the mixing alone
    specialized    the interval's lower end is above MIN_VALUE against the per-image null AND the
                   per-token null (schema 2), and the adapters' gain (scope "all", 1 - L(gate)/L(none))
                   is measured with an interval whose lower end is above 0: the routing matters and
                   the experts it chooses between do useful work
    co_adapted     the value clears MIN_VALUE but the adapters' gain interval lies wholly below
                   MIN_VALUE: a step's routing matters to the steps trained on its output, while the
                   adapters together do (almost) nothing against the frozen base
    gain_unmeasured  the value clears MIN_VALUE, but the adapter gain has no interval (a schema-1
                   result) or its interval neither clears 0 nor lies below MIN_VALUE
    small          the value's interval is above 0 (against both nulls) but its lower end not above
                   MIN_VALUE
    flat_gate      the value is not distinguishable from 0 and the gate is flat (mean top-1 margin
                   below FLAT_MARGIN): an argmax over a nearly uniform gate
    chance         the value is not distinguishable from 0 (margin known and not flat, or unknown)

Without a routing value only the gate's confidence and the structure are known:

    flat_gate             the margin is known and below FLAT_MARGIN
    margin_unknown        the trace has no gate probabilities, so flatness cannot be judged; the
                          structure (AMI, p) is shown but never called structured routing
    structured_unmeasured the margin is known and not flat, and some label's AMI >= MIN_AMI with
                          permutation p <= MAX_P; never "specialized" without a value
    chance                otherwise

When the checkpoint was trained with planted cells (the expert warm start, rsr_model/warm_start.py)
and the routing value carries `planted` (its agreement with the planted assignment on held-out data),
every text says the structure was planted and states that agreement: structure the training forced
is not structure the gate found.

The thresholds are stated, not fitted: MIN_VALUE (2% lower loss than random routing) is the smallest
effect this toolkit calls useful, FLAT_MARGIN a gate whose top two experts differ by < 5 points of
probability. `python -m probes.calibrate` measures how the rules do on models of known truth.

The permutation p of the MI treats tokens as independent; tokens of one image are not, so for
labels constant within an image p is optimistic. That is why the verdict requires an effect size
(AMI) and, for "specialized", a routing value, never p alone.
"""

from __future__ import annotations

from typing import Any

FLAT_MARGIN = 0.05  # mean top-1 minus top-2 gate probability below which the gate is flat
MIN_VALUE = 0.02  # routing value (relative loss reduction vs same-load random) that counts
MIN_AMI = 0.05  # adjusted MI that counts as structure
MAX_P = 0.01

LABELS = ("specialized", "co_adapted", "gain_unmeasured", "small", "harmful", "chance", "flat_gate",
          "margin_unknown", "structured_unmeasured")


def _strongest_label(mi: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    scored = [(name, r) for name, r in mi.items() if r.get("ami") is not None]
    if not scored:
        return None, {}
    return max(scored, key=lambda kv: kv[1]["ami"])


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _interval(x: float, ci: list[float]) -> str:
    return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _gain(whole: dict[str, Any] | None) -> tuple[float | None, list[float] | None]:
    """The adapters' gain (scope "all") and its interval, if measured (schema 1 has no interval)."""
    if not whole or whole.get("adapter_gain") is None:
        return None, None
    return whole["adapter_gain"], whole.get("adapter_gain_ci95")


def _valued(value: dict[str, Any], whole: dict[str, Any] | None, flat: bool) -> tuple[str, str]:
    """Label and text when a routing value was measured for this layer and step."""
    lo, hi = value["value_ci95"]
    token_lo, token_hi = value.get("value_token_ci95") or [lo, hi]
    shown = f"routing value {_interval(value['value'], value['value_ci95'])}"
    if value.get("value_token_ci95"):  # schema 2: both nulls, since every claim must hold against both
        shown += f" per image, {_interval(value['value_token'], value['value_token_ci95'])} per token"
    gain, gain_ci = _gain(whole)
    gain_text = ("adapter gain not measured" if gain is None else f"adapter gain {100 * gain:.2f}%"
                 + (f" [{100 * gain_ci[0]:.2f}, {100 * gain_ci[1]:.2f}]" if gain_ci else " (no interval)"))
    share = (whole or {}).get("routing_share")
    share_text = f"; routing share {share:.2f}" if share is not None and share == share else ""
    if hi < 0 and token_hi < 0:
        return "harmful", f"routing worse than random routing of the same load ({shown})"
    if lo > MIN_VALUE and token_lo > MIN_VALUE:
        if gain_ci is not None and gain_ci[0] > 0:
            return "specialized", f"specialized ({shown}; {gain_text}{share_text})"
        if gain_ci is not None and gain_ci[1] < MIN_VALUE:
            return "co_adapted", (f"routing matters inside the recursion ({shown}) but the adapters together lower "
                                  f"the loss little against the frozen base ({gain_text}): steps trained on each "
                                  f"other's output, not useful specialists")
        return "gain_unmeasured", (f"routing matters ({shown}) but the adapters' own gain is not established "
                                   f"({gain_text})")
    if lo > 0 and token_lo > 0:
        return "small", f"routing helps, but little ({shown}, lower end not above {MIN_VALUE})"
    if flat:
        return "flat_gate", f"argmax over a flat gate; routing not distinguishable from chance ({shown})"
    return "chance", f"routing not distinguishable from chance ({shown})"


def _unvalued(margin: float | None, label: str | None, mi: dict[str, Any]) -> tuple[str, str]:
    """Label and text from the trace's own evidence (no routing value)."""
    structure = f"AMI({label}) {_num(mi.get('ami'))}, p {_num(mi.get('p_value'), '.2g')}"
    structured = mi.get("ami") is not None and mi["ami"] >= MIN_AMI and (mi.get("p_value") or 1.0) <= MAX_P
    if margin is None:
        return "margin_unknown", (f"gate margin unknown (no gate probabilities in the trace): whether the routing "
                                  f"is an argmax over a flat gate cannot be judged ({structure}; record with "
                                  f"--probs and run probes.routing_value)")
    if margin < FLAT_MARGIN:
        return "flat_gate", f"argmax over a flat gate (margin {margin:.3f})"
    if structured:
        return "structured_unmeasured", (f"structured routing, value not measured ({structure}; "
                                         f"run probes.routing_value)")
    return "chance", f"routing not distinguishable from chance ({structure})"


def planted_text(planted: dict[str, Any] | None) -> str:
    """The sentence every verdict of a warm-started checkpoint carries (empty when nothing was planted)."""
    if not planted:
        return ""
    agree = planted.get("agreement")
    measured = (f"; the gate's routing agrees with the planted cells on {100 * agree:.1f}% of held-out tokens "
                f"(chance {100 * planted.get('chance', 0):.1f}%)" if agree is not None else "")
    return (f" — the structure was planted: warm start '{planted['layout']}' forced experts to cells for the first "
            f"{planted['steps']} RSR steps{measured}")


def step_verdict(step_report: dict[str, Any], value: dict[str, Any] | None = None,
                 whole: dict[str, Any] | float | None = None, planted: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verdict of one (layer, step) of a report. `value`: that step's routing-value scope, if measured;
    `whole`: the routing value's scope "all" (its adapter gain and interval; a bare float is read as a
    gain without interval, as schema 1 gave); `planted`: the routing value's `planted` entry."""
    if isinstance(whole, (int, float)):
        whole = {"adapter_gain": float(whole)}
    margin = step_report.get("gate", {}).get("mean_margin")
    label, mi = _strongest_label(step_report.get("mi", {}))
    evidence: dict[str, Any] = {"margin": margin, "strongest_label": label, "ami": mi.get("ami"),
                                "p_value": mi.get("p_value")}
    if value is not None:
        gain, gain_ci = _gain(whole)
        evidence.update(routing_value=value["value"], routing_value_ci95=value["value_ci95"],
                        routing_value_token_ci95=value.get("value_token_ci95"),
                        gate_below_every_forced=value.get("gate_below_every_forced"), adapter_gain=gain,
                        adapter_gain_ci95=gain_ci, routing_share=(whole or {}).get("routing_share"),
                        oracle_gap=value.get("oracle_gap"))
        kind, text = _valued(value, whole, margin is not None and margin < FLAT_MARGIN)
        if margin is None:
            text += "; gate margin unknown"
    else:
        kind, text = _unvalued(margin, label, mi)
    if planted:
        evidence["planted"] = planted
        text += planted_text(planted)
    return {"label": kind, "text": text, "evidence": evidence}


def add_verdicts(report: dict[str, Any], routing_value: dict[str, Any] | None = None) -> None:
    """Write `layers.<layer>.steps.<step>.verdict` into a report (routing value per recursion step).
    The one function every view of a trace uses, so they cannot disagree."""
    scopes = (routing_value or {}).get("scopes", {})
    single_layer = len((routing_value or {}).get("layers", [])) == 1
    planted = (routing_value or {}).get("planted")
    whole = scopes.get("all")
    for layer_id, layer in report["layers"].items():
        for step, step_report in layer["steps"].items():
            # the value measured on this layer's routing: its own scope, or the step's when it is the only layer
            value = scopes.get(f"{layer_id}.{step}") or (scopes.get(str(step)) if single_layer else None)
            step_report["verdict"] = step_verdict(step_report, value, whole, planted)
