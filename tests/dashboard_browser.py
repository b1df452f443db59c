"""Helpers shared by the dashboard's browser and HTTP tests in tests/test_dashboard_*.py files
that build their own fixtures: a recorded trace, a live server on loopback, headless Chromium,
and one POST of a callback as the page sends it."""

from __future__ import annotations

import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from probes.projections import derive
from probes.record import main as record_main
from rsr_model.__main__ import main as rsr_main

from .dashboard_page import call, click, payload, text_of, wait_for  # noqa: F401 -- the page helpers, re-exported
from .dashboard_page import console_errors as severe_console_errors  # noqa: F401 -- its older name here

PROMPTS = "two red circles left of a blue square\na green triangle\n"


def record_env(d: Path, latent_tokens: int = 64) -> dict:
    """A tiny checkpoint, a trace recorded from it (probabilities, latents, early-exit decodes)
    and a copy with PCA projections, both in `served/`."""
    ckpt = d / "tiny.pt"
    assert rsr_main(["train", "--out", str(ckpt), "--steps", "2", "--batch-size", "4"]) == 0
    (d / "prompts.txt").write_text(PROMPTS)
    served = d / "served"
    served.mkdir()
    trace = served / "run.h5"
    assert record_main(["--ckpt", str(ckpt), "--prompts", str(d / "prompts.txt"), "--num-samples", "1",
                        "--steps", "4", "--out", str(trace), "--probs", "--latent-tokens", str(latent_tokens),
                        "--decode"]) == 0
    derived = served / "derived.h5"
    shutil.copy(trace, derived)
    derive(derived)
    return {"dir": d, "ckpt": ckpt, "trace": trace, "derived": derived, "served": served}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(flask_app):
    """The app on a free loopback port (threaded werkzeug); yields its base URL."""
    from werkzeug.serving import make_server

    port = free_port()
    server = make_server("127.0.0.1", port, flask_app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()


@contextmanager
def chromium(height: int = 900):
    """Headless Chromium, 1366 px wide (skips the test when it or chromedriver is missing)."""
    if not (shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("google-chrome"))):
        pytest.skip("chromium and chromedriver are not installed (scripts/setup.sh installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", f"--window-size=1366,{height}",
                "--enable-unsafe-swiftshader", "--disable-dev-shm-usage"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def text(driver, element_id: str) -> str:
    """The visible text of an element, '' while it does not exist."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    try:
        return found[0].text if found else ""
    except Exception:  # replaced while read (stale): read again on the next poll
        return ""


def drag_box(driver, css: str, frac=(0.1, 0.1, 0.5, 0.5), steps: int = 4) -> None:
    """Drag a box (select or lasso) on a plot's drag layer from one fraction of its size to another."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    plot = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, css))[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", plot)
    w, h = plot.size["width"], plot.size["height"]
    x0, y0, x1, y1 = (int(f * s) for f, s in zip(frac, (w, h, w, h)))
    chain = ActionChains(driver).move_to_element(plot).move_by_offset(x0 - w // 2, y0 - h // 2).click_and_hold()
    for _ in range(steps):
        chain = chain.move_by_offset((x1 - x0) // steps, (y1 - y0) // steps)
    chain.release().perform()


def lasso_all(driver, css: str) -> None:
    """A lasso around the whole plot area."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    plot = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, css))[0]
    w, h = plot.size["width"], plot.size["height"]
    chain = ActionChains(driver).move_to_element(plot).move_by_offset(-w // 2 + 3, -h // 2 + 3).click_and_hold()
    for dx, dy in ((w - 6, 0), (0, h - 6), (-(w - 6), 0), (0, -(h - 10))):
        for _ in range(4):
            chain = chain.move_by_offset(dx // 4, dy // 4)
    chain.release().perform()
