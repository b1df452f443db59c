"""Dashboard benchmark: `python -m benchmarks.dashboard_latency [--moves 200] [--no-browser]`.

On a synthetic trace of 64 samples x 28 timesteps x 5 recursion steps x 4 layers x 4096 tokens
(K=8; 64 stored latent tokens of 32 dims, 32x32 early-exit decodes; written once into
runs/bench/dashboard.h5 with PCA projections, by a child process) it measures:

* the report: first analysis (cold; the dashboard runs `probes.report` in a child process,
  whose peak memory is reported apart from the server's) and a second start (cache beside
  the trace);
* first page interactive from `python -m dashboard` start with a warm cache (headless
  Chromium, launched beforehand, until the overview figure is drawn; HTTP only with
  --no-browser), of which the Python imports alone, and that server's resident memory;
* slider moves on the routing map: server time per callback (Flask test client, Patch
  updates alternating timestep and recursion step moves), median / p95, bytes per update;
* the latent explorer at 300k points: server time and payload of the figure, and the
  browser frame time of a pan (relayout -> plotly_afterplot) in headless Chromium
  (SwiftShader software WebGL: a pessimistic bound for a laptop GPU);
* this process's peak resident memory (it holds the app and served all of the above).

`--browser-runs TRACE` measures a given trace (the demo's) in headless Chromium instead, each
of `--runs` times on a fresh `python -m dashboard` process: the first page interactive (the
overview figure drawn) cold (the report cache removed, so the report is computed) and warm
(cached), and a slider key-press (ArrowRight / ArrowLeft on the timestep slider) to the routing map
redrawn (plotly_afterplot), timed inside the page.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

S, T, STEPS, LAYERS, N, K = 64, 28, 5, [2, 6, 10, 14], 4096, 8
LATENT_TOKENS, LATENT_DIM, IMAGE = 64, 32, (32, 32, 3)


def cold_report(path: Path) -> None:
    """First analysis of the trace (writes the cache beside it); prints time and peak memory."""
    from dashboard.common import make_context

    ctx = make_context([str(path)])
    t0 = time.perf_counter()
    ctx.registry.report(ctx.registry.ids()[0])
    print(json.dumps({"report_first_s": time.perf_counter() - t0,
                      "report_first_server_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "report_first_analysis_peak_rss_mib":
                          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def make_trace(path: Path) -> None:
    from probes.projections import derive
    from traces import SamplingLayout
    from traces.synthetic import write_synthetic

    lo = SamplingLayout(n_experts=K, layers=LAYERS, steps=STEPS, tokens=N, timesteps=list(range(T)),
                        timestep_values=list(np.linspace(1000, 0, T, endpoint=False)),
                        latent_tokens=list(range(0, N, N // LATENT_TOKENS)), latent_dim=LATENT_DIM,
                        image_shape=IMAGE)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_synthetic(path, lo, S, batch=8, overwrite=True)
    t1 = time.perf_counter()
    derive(path, overwrite=True)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {t1 - t0:.0f} s, PCA in "
          f"{time.perf_counter() - t1:.0f} s")


def routing_moves(app, tid: str, moves: int) -> dict[str, float]:
    """Server time of routing-map updates (Patch) for slider moves, through the Flask stack."""
    from dashboard.common import gate_value

    client = app.server.test_client()
    output = ("..routing-map.figure...routing-decoded.src...routing-final.src...routing-decoded-note.children"
              "...routing-msg.children...routing-key.data..")
    cb = app.callback_map[output]
    rng = np.random.default_rng(0)

    gate = next(i["id"] for i in cb["inputs"] if i["id"] in app.dashboard_gates)  # the view's selection

    def post(values, changed):
        def value(i):
            if i["id"] == gate:  # what the page's gate (run in the browser) sends
                return gate_value(app, gate, values, changed)
            return values.get(f"{i['id']}.{i['property']}")
        payload = {"output": output, "outputs": [{"id": o.split(".")[0], "property": o.split(".")[1]}
                                                 for o in output.strip(".").split("...")],
                   "inputs": [{**i, "value": value(i)} for i in cb["inputs"]],
                   "state": [{**i, "value": value(i)} for i in cb["state"]],
                   "changedPropIds": [f"{gate}.data"]}
        t0 = time.perf_counter()
        r = client.post("/_dash-update-component", json=payload)
        return time.perf_counter() - t0, r

    values = {"tabs.value": "routing", "sel-trace.value": tid, "sel-sample.value": 0, "sel-branch.value": "cond",
              "sel-t.value": 0, "sel-layer.value": LAYERS[0], "sel-step.value": 0}
    _, r = post(values, "sel-trace.value")
    values["routing-key.data"] = r.get_json()["response"]["routing-key"]["data"]
    times, sizes = [], []
    for i in range(moves):
        if i % 2:
            values["sel-step.value"] = int(rng.integers(STEPS))
            changed = "sel-step.value"
        else:
            values["sel-t.value"] = int(rng.integers(T))
            changed = "sel-t.value"
        dt, r = post(values, changed)
        assert r.status_code == 200 and "__dash_patch_update" in r.get_data(as_text=True)
        times.append(dt * 1e3)
        sizes.append(len(r.data))
    times.sort()
    return {"moves": moves, "median_ms": statistics.median(times), "p95_ms": times[int(0.95 * len(times)) - 1],
            "max_ms": times[-1], "bytes_median": statistics.median(sizes)}


def latent_server(ctx, tid: str) -> tuple[dict[str, float], object]:
    from dashboard.views.latent import points, scatter_figure

    tr = ctx.registry.reader(tid)
    t0 = time.perf_counter()
    pts = points(tr, "pca", LAYERS[0])
    t1 = time.perf_counter()
    fig = scatter_figure(tr, pts, "expert", 300_000)
    payload = fig.to_json()
    t2 = time.perf_counter()
    return {"points": int(len(pts["x"])), "load_s": t1 - t0, "figure_s": t2 - t1,
            "payload_mib": len(payload) / 2**20}, fig


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1366,768",
                "--enable-unsafe-swiftshader", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts)


def frame_time(fig, pans: int = 10) -> dict[str, float]:
    """Browser time from a pan (relayout) to plotly_afterplot for the 300k-point Scattergl."""
    html = Path("runs/bench/latent300k.html")
    fig.write_html(html, include_plotlyjs=True, div_id="plot", full_html=True)
    d = chrome()
    try:
        t0 = time.perf_counter()
        d.get(html.resolve().as_uri())
        d.execute_script("return 1")
        first = d.execute_async_script(
            "const done = arguments[0]; const gd = document.getElementById('plot');"
            "const wait = () => gd._fullLayout ? done(performance.now()) : setTimeout(wait, 20); wait();")
        load_s = time.perf_counter() - t0
        ms = []
        for i in range(pans):
            ms.append(d.execute_async_script(
                "const done = arguments[0]; const gd = document.getElementById('plot');"
                "const r = gd._fullLayout.xaxis.range; const w = (r[1] - r[0]) * 0.05;"
                "const t0 = performance.now(); gd.once('plotly_afterplot', () => done(performance.now() - t0));"
                "Plotly.relayout(gd, {'xaxis.range': [r[0] + w, r[1] + w]});"))
        ms.sort()
        return {"page_load_s": load_s, "first_draw_ms": first, "pan_median_ms": statistics.median(ms),
                "pan_max_ms": ms[-1]}
    finally:
        d.quit()


def first_page(trace: Path, browser: bool) -> dict[str, float]:
    """Seconds from `python -m dashboard` start to the overview figure drawn (warm cache)."""
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = chrome() if browser else None  # launched first: its start-up is not the dashboard's
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dashboard", str(trace), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    raise RuntimeError("dashboard did not start")
                time.sleep(0.05)
        served = time.perf_counter() - t0
        out = {"http_up_s": served}
        if d is not None:
            d.get(url + "?view=overview")
            while not d.execute_script("return !!document.querySelector('#overview-share .main-svg')"):
                time.sleep(0.05)
            out["interactive_s"] = time.perf_counter() - t0
        out["server_rss_mib"] = psutil.Process(proc.pid).memory_info().rss / 2**20
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import dashboard.__main__, dashboard.app"], check=True)
        out["imports_s"] = time.perf_counter() - t1
        return out
    finally:
        if d is not None:
            d.quit()
        proc.terminate()
        proc.wait(10)


def clear_cache(trace: Path) -> None:
    """Remove what the dashboard cached for `trace` (its report, comparisons)."""
    from dashboard.data import REPORT_SUFFIX, cache_path

    for cache in cache_path(trace, REPORT_SUFFIX).parent.glob(trace.name + ".*.json"):
        cache.unlink()
    for cache in trace.parent.glob(trace.name + ".*.json"):  # beside the trace: older dashboards
        cache.unlink()


def start_dashboard(trace: Path) -> tuple[subprocess.Popen, str]:
    """`python -m dashboard TRACE` on a free loopback port, once it answers."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dashboard", str(trace), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError("dashboard did not start")
            time.sleep(0.05)


PRESS = ("const done = arguments[arguments.length - 1]; const key = arguments[0];"
         "const gd = document.querySelector('#routing-map .js-plotly-plot');"
         "const thumb = document.querySelector('#sel-t [role=slider]');"
         "thumb.focus(); const t0 = performance.now();"
         "gd.once('plotly_afterplot', () => done(performance.now() - t0));"
         "thumb.dispatchEvent(new KeyboardEvent('keydown', {key: key, bubbles: true}));")


def browser_run(trace: Path, d, cold: bool, presses: int) -> dict[str, float]:
    """One fresh dashboard process: seconds from its start to the overview drawn, then the
    key-press to redrawn-map times (ms) on the routing map."""
    import psutil
    from selenium.webdriver.common.by import By

    if cold:
        clear_cache(trace)
    t0 = time.perf_counter()
    proc, url = start_dashboard(trace)
    try:
        d.get(url + "?view=overview")
        while not d.execute_script("return !!document.querySelector('#overview-share .main-svg')"):
            time.sleep(0.02)
        out: dict[str, float] = {"first_page_s": time.perf_counter() - t0}
        d.find_element(By.XPATH, "//*[@id='tabs']//*[text()='Routing map']").click()
        while not d.execute_script("const g = document.querySelector('#routing-map .js-plotly-plot');"
                                   "return !!(g && g.calcdata);"):
            time.sleep(0.02)
        time.sleep(0.5)
        ms = []
        for i in range(presses):  # right, left, right...: the slider never sits at an end
            ms.append(d.execute_async_script(PRESS, "ArrowLeft" if i % 2 else "ArrowRight"))
            time.sleep(0.2)
        ms.sort()
        out.update(press_median_ms=statistics.median(ms), press_max_ms=ms[-1])
        # the server after the first page and the key presses
        out["server_rss_mib"] = psutil.Process(proc.pid).memory_info().rss / 2**20
        t1 = time.perf_counter()  # the page opened again on the same server: the browser's cache holds plotly.js
        d.get(url + "?view=overview")
        while not d.execute_script("return !!document.querySelector('#overview-share .main-svg')"):
            time.sleep(0.02)
        out["reload_s"] = time.perf_counter() - t1
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def browser_runs(trace: Path, runs: int, presses: int) -> dict[str, list]:
    """`runs` cold and `runs` warm browser runs (`browser_run`), alternating cold, warm."""
    d = chrome()  # launched first: its start-up is not the dashboard's
    d.set_script_timeout(30)
    try:
        res: dict[str, list] = {"cold": [], "warm": []}
        for _ in range(runs):
            res["cold"].append(browser_run(trace, d, True, presses))
            res["warm"].append(browser_run(trace, d, False, presses))
        return res
    finally:
        d.quit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dashboard_latency", description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, default=Path("runs/bench/dashboard.h5"))
    p.add_argument("--moves", type=int, default=200)
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--child", choices=["make", "report"], help=argparse.SUPPRESS)
    p.add_argument("--browser-runs", type=Path, metavar="TRACE",
                   help="measure TRACE in the browser only (first page cold / warm, key-press to redrawn map)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--presses", type=int, default=10)
    a = p.parse_args(argv)
    if a.browser_runs:
        res = browser_runs(a.browser_runs, a.runs, a.presses)
        print(json.dumps(res, indent=1))
        return 0
    if a.child == "make":
        make_trace(a.trace)
        return 0
    if a.child == "report":
        cold_report(a.trace)
        return 0
    # Writing and the first analysis run in child processes: their memory is not the server's.
    child = [sys.executable, "-m", "benchmarks.dashboard_latency", "--trace", str(a.trace), "--child"]
    if not a.trace.exists():
        subprocess.run(child + ["make"], check=True)
    clear_cache(a.trace)
    cold = subprocess.run(child + ["report"], check=True, capture_output=True, text=True).stdout
    browser = not a.no_browser and bool(shutil.which("chromedriver"))
    from dashboard.app import create_app
    from dashboard.common import make_context

    res: dict[str, object] = {"trace_mib": a.trace.stat().st_size / 2**20, **json.loads(cold.splitlines()[-1])}
    ctx = make_context([str(a.trace)])
    tid = ctx.registry.ids()[0]
    t0 = time.perf_counter()
    ctx.registry.report(tid)
    res["report_cached_s"] = time.perf_counter() - t0
    res["first_page"] = first_page(a.trace, browser)
    app = create_app(ctx)
    res["slider"] = routing_moves(app, tid, a.moves)
    res["latent"], fig = latent_server(ctx, tid)
    res["serving_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if browser:
        res["latent_browser"] = frame_time(fig)
    print(json.dumps(res, indent=1))
    Path("runs/bench/dashboard_latency.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
