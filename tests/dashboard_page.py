"""Driving the dashboard as its page does: callbacks POSTed over the app's test client, the
text of a rendered component tree, and waits and clicks for the headless browser (the `browser`
fixture is in tests/conftest.py). Used by every dashboard test file."""

import re
import time

from dashboard.common import gate_value


def payload(app, output: str, values: dict, changed: str | None = None) -> dict:
    """The JSON body the page POSTs to /_dash-update-component for the callback with `output`;
    `values` maps 'id.prop' to the value of every Input/State (missing ones are None). A view's
    callback reads the selection through its gate store (`dashboard.common.view_body`): its value
    is built from 'tabs.value' and the selection's 'sel-*.value' as the page's gate would
    (`gate_value`: None while another tab is open), unless `values` names the store itself."""
    if output not in app.callback_map:  # outputs with allow_duplicate carry an '@hash' suffix
        output = next(k for k in app.callback_map if re.sub(r"@[0-9a-f]+", "", k) == output)
    cb = app.callback_map[output]

    gates = getattr(app, "dashboard_gates", {})

    def value(i):
        key = f"{i['id']}.{i['property']}"
        if i["id"] in gates and key not in values:  # a view's gate: what the page's clientside gate writes
            return gate_value(app, i["id"], values, changed)
        return values.get(key)

    def fill(items):
        return [{"id": i["id"], "property": i["property"], "value": value(i)} for i in items]
    outs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in output.strip(".").split("...")]
    mine = {f"{i['id']}.{i['property']}" for i in cb["inputs"]}
    gate = next((f"{i['id']}.data" for i in cb["inputs"] if i["id"] in gates), None)
    if changed and changed not in mine and gate:  # a selection control moved: the page sends its gate
        changed_ids = [gate]
    else:
        changed_ids = [changed] if changed else []
    return {"output": output, "outputs": outs if len(outs) > 1 else outs[0], "inputs": fill(cb["inputs"]),
            "state": fill(cb["state"]), "changedPropIds": changed_ids}


def call(app, output: str, values: dict, changed: str | None = None) -> dict:
    """POST one callback the way the page does; {component id: {prop: value}}; asserts no 500."""
    r = app.server.test_client().post("/_dash-update-component", json=payload(app, output, values, changed))
    assert r.status_code in (200, 204), r.data[:500]
    if r.status_code == 204:
        return {}
    return {cid: {re.sub(r"@[0-9a-f]+", "", prop): v for prop, v in props.items()}
            for cid, props in r.get_json()["response"].items()}


def text_of(component) -> str:
    """All text inside a serialised Dash component tree."""
    if isinstance(component, str):
        return component
    if isinstance(component, (int, float)) or component is None:
        return ""
    if isinstance(component, list):
        return " ".join(text_of(c) for c in component)
    if isinstance(component, dict):
        return text_of(component.get("props", {}).get("children"))
    return ""


SYNC = ("..url.search...status.children...sel-trace.options...sel-sample.options...sel-branch.options...sel-t.max"
        "...sel-t.marks...sel-layer.options...sel-step.max...sel-step.marks...sel-expert.options...sel-trace.value"
        "...sel-sample.value...sel-branch.value...sel-t.value...sel-layer.value...sel-step.value...sel-expert.value"
        "...tabs.value..")
ROUTING = ("..routing-map.figure...routing-decoded.src...routing-final.src...routing-decoded-note.children"
           "...routing-msg.children...routing-key.data..")


def selection(app, search: str = "") -> dict:
    out = call(app, SYNC, {"url.search": search}, "url.search")
    return {k: v.get("value") for k, v in out.items() if "value" in v} | {"status": out["status"]["children"],
                                                                          "search": out["url"]["search"]}


def wait_for(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def click(driver, xpath: str) -> None:
    """Click an element that a callback may still be re-rendering (retry while it is replaced)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By

    def attempt(d):
        try:
            found = d.find_elements(By.XPATH, xpath)
            if found:
                found[0].click()
                return True
        except (StaleElementReferenceException, WebDriverException):  # replaced, or covered while redrawn
            pass
        return False
    wait_for(driver, attempt)


def click_until(driver, xpath: str, condition, timeout: float = 30, every: float = 3):
    """Click, then wait up to `every` seconds for `condition`; click again if it has not come (a click on an
    element that a callback re-renders right after can land on the old copy and be lost)."""
    from selenium.common.exceptions import TimeoutException

    deadline = time.monotonic() + timeout
    while True:
        click(driver, xpath)
        try:
            return wait_for(driver, condition, timeout=min(every, max(0.1, deadline - time.monotonic())))
        except TimeoutException:
            if time.monotonic() >= deadline:
                raise


def console_errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
