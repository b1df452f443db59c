"""A plain verdict per layer and recursion step: is the routing specialization, or noise?

Routing statistics describe which expert the argmax picked; an argmax over a flat gate still
picks one, and on millions of tokens a tiny MI is "significant". The verdict weighs the three
pieces of evidence a researcher would, in this order:

1. the gate's confidence (`gate.mean_margin`, top-1 minus top-2 probability, needs
   /routing/prob): below FLAT_MARGIN the choice is an argmax over a flat gate, whatever the MI;
2. the routing value (`probes.routing_value`): the loss with the gate's routing against random
   routing with the same load, with its bootstrap interval; "specialized" needs its lower end
   above MIN_VALUE (the gate's assignment lowers the loss by at least that fraction);
3. the structure of the routing: the largest adjusted MI of the expert with any label, with its
   permutation p. Without a routing value, structure alone gives "structured routing (value not
   measured)", never "specialized".

Labels: "flat_gate", "specialized", "co_adapted" (a step's routing matters, but the adapters of
all steps together lower the loss by less than MIN_VALUE against the frozen base: later steps
were trained on its output, so disturbing it hurts, yet the experts do no useful work), "small"
(a routing value whose interval is above 0 but not above MIN_VALUE), "chance",
"structured_unmeasured". The routing value used is the one measured
on that layer's own routing (per-layer scopes when RSR sits on several layers).

The permutation p of the MI treats tokens as independent; tokens of one image are not, so for
labels constant within an image (prompt attributes; the timestep bin of a training trace) p is
optimistic. That is why the verdict requires an effect size (AMI) and, for "specialized", a
routing value, never p alone.
"""

from __future__ import annotations

from typing import Any

FLAT_MARGIN = 0.05  # mean top-1 minus top-2 gate probability below which the gate is flat
MIN_VALUE = 0.02  # routing value (relative loss reduction vs same-load random) that counts
MIN_AMI = 0.05  # adjusted MI that counts as structure
MAX_P = 0.01


def _strongest_label(mi: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    scored = [(name, r) for name, r in mi.items() if r.get("ami") is not None]
    if not scored:
        return None, {}
    return max(scored, key=lambda kv: kv[1]["ami"])


def step_verdict(step_report: dict[str, Any], value: dict[str, Any] | None = None,
                 adapter_gain: float | None = None) -> dict[str, Any]:
    """Verdict of one (layer, step) of a report; `value` is that step's routing-value scope, if measured,
    and `adapter_gain` the whole model's gain from its adapters (scope "all": 1 - loss(gate)/loss(none))."""
    margin = step_report.get("gate", {}).get("mean_margin")
    label, mi = _strongest_label(step_report.get("mi", {}))
    evidence: dict[str, Any] = {"margin": margin, "strongest_label": label, "ami": mi.get("ami"),
                                "p_value": mi.get("p_value")}
    if value is not None:
        evidence.update(routing_value=value["value"], routing_value_ci95=value["value_ci95"],
                        gate_below_every_forced=value["gate_below_every_forced"], adapter_gain=adapter_gain)
    structured = mi.get("ami") is not None and mi["ami"] >= MIN_AMI and (mi.get("p_value") or 1.0) <= MAX_P
    if margin is not None and margin < FLAT_MARGIN:
        kind, text = "flat_gate", f"argmax over a flat gate (margin {margin:.3f})"
    elif value is not None and value["value_ci95"][0] > MIN_VALUE and adapter_gain is not None \
            and adapter_gain < MIN_VALUE:
        kind = "co_adapted"
        text = (f"routing matters inside the recursion (routing value {value['value']:.3f} "
                f"[{value['value_ci95'][0]:.3f}, {value['value_ci95'][1]:.3f}]) but the adapters together lower "
                f"the loss only {100 * adapter_gain:.1f}% against the frozen base: steps trained on each "
                f"other's output, not useful specialists")
    elif value is not None and value["value_ci95"][0] > MIN_VALUE:
        kind = "specialized"
        text = (f"specialized (routing value {value['value']:.3f} [{value['value_ci95'][0]:.3f}, "
                f"{value['value_ci95'][1]:.3f}], AMI({label}) {_num(mi.get('ami'))}, p {_num(mi.get('p_value'), '.2g')}"
                + (f"; the adapters together lower the loss {100 * adapter_gain:.1f}% against the frozen base"
                   if adapter_gain is not None else "") + ")")
    elif value is not None and value["value_ci95"][0] > 0:
        kind = "small"
        text = (f"routing helps, but little (routing value {value['value']:.3f} [{value['value_ci95'][0]:.3f}, "
                f"{value['value_ci95'][1]:.3f}], below {MIN_VALUE})")
    elif value is not None or not structured:
        kind = "chance"
        shown = (f"routing value {value['value']:.3f} [{value['value_ci95'][0]:.3f}, {value['value_ci95'][1]:.3f}]"
                 if value is not None else f"AMI({label}) {_num(mi.get('ami'))}, p {_num(mi.get('p_value'), '.2g')}")
        text = f"routing not distinguishable from chance ({shown})"
    else:
        kind = "structured_unmeasured"
        text = (f"structured routing, value not measured (AMI({label}) {_num(mi.get('ami'))}, "
                f"p {_num(mi.get('p_value'), '.2g')}; run probes.routing_value)")
    return {"label": kind, "text": text, "evidence": evidence}


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def add_verdicts(report: dict[str, Any], routing_value: dict[str, Any] | None = None) -> None:
    """Write `layers.<layer>.steps.<step>.verdict` into a report (routing value per recursion step)."""
    scopes = (routing_value or {}).get("scopes", {})
    single_layer = len((routing_value or {}).get("layers", [])) == 1
    for layer_id, layer in report["layers"].items():
        for step, step_report in layer["steps"].items():
            # the value measured on this layer's routing: its own scope, or the step's when it is the only layer
            value = scopes.get(f"{layer_id}.{step}") or (scopes.get(str(step)) if single_layer else None)
            whole = scopes.get("all", {}).get("adapter_gain")
            step_report["verdict"] = step_verdict(step_report, value, whole)
