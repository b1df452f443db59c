"""Screenshots of every dashboard view in headless Chromium at 1366x768 (docs/screenshots/).

    python -m benchmarks.dashboard_screenshots runs/demo/trace.h5 [--ckpt runs/demo/sd3_rsr.pt] \
        [--compare runs/demo/ablate.h5] [--training runs/demo/train.h5] [--out docs/screenshots]

The first trace is the one shown; it should have latents with projections (`probes.derive`)
and early-exit decodes. Each view is opened by URL, given time to draw, and driven the way
a researcher would (a lasso in the latent explorer, the overlay in the filmstrip, a run in
Intervene) before the shot.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from benchmarks.dashboard_latency import chrome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dashboard_screenshots", description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--compare", type=Path, help="a second trace on the same grid")
    p.add_argument("--training", type=Path, help="a training trace")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    p.add_argument("--expert", type=int, default=1)
    a = p.parse_args(argv)

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from werkzeug.serving import make_server

    from dashboard.app import create_app
    from dashboard.common import make_context
    from dashboard.data import trace_id

    traces = [str(x) for x in (a.trace, a.compare, a.training) if x]
    ctx = make_context(traces, a.ckpt)
    server = make_server("127.0.0.1", 0, create_app(ctx).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    tid = trace_id(a.trace)
    tr = ctx.registry.reader(tid)
    T, R = len(tr.coords["timestep"]), len(tr.coords["step"])
    a.out.mkdir(parents=True, exist_ok=True)
    d = chrome()

    def wait(css: str, timeout: float = 120) -> list:
        t0 = time.time()
        while time.time() - t0 < timeout:
            found = d.find_elements(By.CSS_SELECTOR, css)
            if found:
                return found
            time.sleep(0.2)
        raise TimeoutError(css)

    def shot(name: str, query: str, ready: str, action=None, height: int = 768) -> None:
        d.set_window_size(1366, height)
        d.get(url + query)
        wait(ready)
        time.sleep(1.5)
        if action:
            action()
        d.save_screenshot(str(a.out / f"{name}.png"))
        print(f"{a.out / name}.png")

    def lasso() -> None:
        plot = wait("#lat-scatter .nsewdrag")[0]
        w, h = plot.size["width"], plot.size["height"]
        chain = ActionChains(d).move_to_element(plot).move_by_offset(-w // 4, -h // 4).click_and_hold()
        for dx, dy in ((w // 2, 0), (0, h // 2), (-w // 2, 0), (0, -h // 2 + 4)):
            for _ in range(4):
                chain = chain.move_by_offset(dx // 4, dy // 4)
        chain.release().perform()
        wait("#lat-table td")
        time.sleep(1)

    def overlay() -> None:
        d.find_element(By.CSS_SELECTOR, "#film-overlay input").click()
        time.sleep(2)

    def intervene() -> None:
        grid = wait("#iv-grid .nsewdrag")[0]  # paint a region: the upper left quarter
        w, h = grid.size["width"], grid.size["height"]
        ActionChains(d).move_to_element(grid).move_by_offset(-w // 2 + 4, -h // 2 + 4).click_and_hold() \
            .move_by_offset(w // 4, h // 4).move_by_offset(w // 4, h // 4).release().perform()
        time.sleep(1.5)
        d.find_element(By.ID, "iv-run").click()
        wait("#iv-summary", 300)
        time.sleep(1)

    q = f"?trace={tid}&expert={a.expert}&t={T // 2}&step={R - 1}"
    try:
        shot("1_specialization", q + "&view=overview", "#overview-share .main-svg")
        shot("2_routing_map", q + "&view=routing", "#routing-map .main-svg")
        shot("3_recursion_flow", q + "&view=flow", "#flow-body .main-svg")
        shot("4_latent_explorer", q + "&view=latent", "#lat-scatter .main-svg", lasso)
        shot("5_expert", q + "&view=expert", "#expert-title", height=1100)
        shot("6_filmstrip", q + "&view=filmstrip", "#filmstrip-body img", overlay, height=1000)
        if a.ckpt:
            shot("7_intervene", q + "&view=intervene", "#iv-grid .main-svg", intervene, height=1000)
        if a.training:
            shot("8_training_health", f"?trace={trace_id(a.training)}&view=training", "#training-body .main-svg")
        if a.compare:
            shot("9_compare", q + "&view=compare", "#compare-body .main-svg")
        shot("10_results", q + "&view=results", "#results-body .result", height=1000)
    finally:
        d.quit()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
