"""The toolkit as a user installs it: a wheel built from this tree, installed (not editable) into
a fresh virtual environment, and its console commands run from a folder outside the repository.

Every other test imports the clone (editable install or PYTHONPATH), so a file missing from the
wheel (the dashboard's stylesheet, the report and schema contracts) or a default that only works
inside the clone would go unnoticed there. Here nothing of the clone is importable: PYTHONPATH is
dropped, the working folder is a temporary one, and the installed package's files are checked to
lie inside the new environment.

Dependencies are not downloaded again: a .pth file in the new environment appends this
interpreter's site-packages (torch from the pinned CPU wheel, diffusers, ...). Paths added by a
.pth file are not themselves scanned for .pth files, so the clone's editable-install hook there
stays inactive (checked below through `__file__`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import h5py
import pytest
import torch

from .dashboard_browser import chromium, free_port

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("rsr", "rsr-record", "rsr-report", "rsr-dashboard", "rsr-traces")  # [project.scripts]
PACKAGES = ("cli_common", "evaluation", "rsr_model", "traces", "probes", "dashboard")
PACKAGE_DATA = ("dashboard/assets/style.css", "probes/REPORT.md", "traces/SCHEMA.md")
# Not part of a build: the clone's own outputs, environments and caches (as in .gitignore).
NOT_SOURCE = (".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", "*.h5", "*.pt",
              "*.log", "*.png")
PROMPTS = "two red circles left of a blue square\na green triangle\n"
HEADER_BACKGROUND = "rgb(36, 41, 47)"  # .header in dashboard/assets/style.css (#24292f); unstyled it is transparent


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def build_wheel(out: Path) -> Path:
    """The wheel of a copy of the source tree: building in place would leave build/ in the clone,
    whose stale files a later build can put into the wheel."""
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (out / "dist").glob("thinking_pixel-*.whl")
    return wheel


def make_venv(where: Path) -> Path:
    """A fresh environment that sees this interpreter's site-packages after its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(own) / "_thinking_pixel_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, environment for its commands, empty working folder outside the clone)."""
    d = tmp_path_factory.mktemp("installed")
    wheel = build_wheel(d)
    python = make_venv(d / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(d / "venv"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work = d / "work"
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    return {"bin": python.parent, "env": env, "work": work, "venv": d / "venv", "wheel": wheel}


def run(installed, *argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(installed["bin"] / argv[0]), *argv[1:]], cwd=installed["work"], env=installed["env"],
                          capture_output=True, text=True, timeout=300)
    if ok:
        assert done.returncode == 0, f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def recorded(installed):
    """A tiny checkpoint, a sample, a trace at record's default path and its report, all made by
    the console commands in the working folder."""
    w = installed["work"]
    run(installed, "rsr", "train", "--steps", "2", "--batch-size", "4", "--save-every", "1", "--out", "tiny.pt")
    run(installed, "rsr", "sample", "--ckpt", "tiny.pt", "--prompt", "a red circle", "--steps", "2",
        "--out", "sample.png")
    (w / "prompts.txt").write_text(PROMPTS)
    run(installed, "rsr-record", "--ckpt", "tiny.pt", "--prompts", "prompts.txt", "--steps", "4", "--probs",
        "--latent-tokens", "16", "--decode")  # --out left to its default, runs/trace.h5
    run(installed, "rsr-report", "runs/trace.h5", "--json", "report.json", "--permutations", "19")
    return w


def test_installed_package_is_the_wheel_with_its_data(installed):
    code = ("import importlib, json; print(json.dumps({m: importlib.import_module(m).__file__ for m in %r}))"
            % (PACKAGES,))
    files = json.loads(run(installed, "python", "-c", code).stdout)
    site = installed["venv"].resolve()
    for name, file in files.items():
        assert Path(file).resolve().is_relative_to(site), f"{name} imported from {file}, not the installed wheel"
    package_root = Path(files["dashboard"]).resolve().parents[1]
    for data in PACKAGE_DATA:
        assert (package_root / data).read_bytes() == (ROOT / data).read_bytes(), data


def test_every_command_reports_the_package_version(installed):
    for command in COMMANDS:
        out = run(installed, command, "--version").stdout
        assert out.strip() == f"thinking-pixel {project_version()}", (command, out)


def test_version_without_package_metadata(monkeypatch):
    """Run from a source tree pip never installed: a PEP 440 placeholder, not a crash."""
    from importlib import metadata

    from cli_common import version

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    version.toolkit_version.cache_clear()
    try:
        assert version.toolkit_version() == "0+unknown"
        assert version.version_line() == "thinking-pixel 0+unknown"
    finally:
        version.toolkit_version.cache_clear()


def test_train_sample_record_report_convert_from_outside_the_clone(installed, recorded):
    version = project_version()
    w = recorded
    assert (w / "sample.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.load(w / "tiny.pt", map_location="cpu", weights_only=True)["toolkit_version"] == version
    report = json.loads((w / "report.json").read_text())
    assert report["schema"] == "rsr-report" and report["toolkit_version"] == version and report["layers"]
    run(installed, "rsr-traces", "convert", "runs/trace.h5", "portable.h5", "--portable")
    with h5py.File(w / "portable.h5", "r") as f:  # gzip: plain h5py reads it without hdf5plugin
        assert f.attrs["schema"] == "rsr-trace" and f.attrs["toolkit_version"] == version
        assert f["/routing/expert"].compression == "gzip" and f["/routing/expert"][()].size
    # A path that exists only in the clone fails with one line naming it, not a traceback.
    done = run(installed, "rsr-record", "--ckpt", "tiny.pt", "--prompts", "examples/prompts.txt", "--out", "x.h5",
               ok=False)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == ["error: file not found: examples/prompts.txt"]


# ----------------------------------------------------------------------------- the dashboard


@pytest.fixture(scope="module")
def dashboard_url(installed, recorded):
    """`rsr-dashboard` serving the working folder's runs/ (its default) on a loopback port."""
    port = free_port()
    log = (recorded / "dashboard.log").open("w")
    proc = subprocess.Popen([str(installed["bin"] / "rsr-dashboard"), "--port", str(port), "--permutations", "19"],
                            cwd=recorded, env=installed["env"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"rsr-dashboard did not serve {url}:\n{(recorded / 'dashboard.log').read_text()}")
            time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_dashboard_serves_its_stylesheet(dashboard_url):
    with urllib.request.urlopen(f"{dashboard_url}/assets/style.css", timeout=10) as r:
        assert r.read() == (ROOT / "dashboard" / "assets" / "style.css").read_bytes()


def test_installed_dashboard_is_styled_in_a_browser(dashboard_url):
    """The stylesheet applied: the header's computed style, not only a served file. With
    SCREENSHOT=path set, the page (overview rendered) is saved there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium(height=768) as driver:
        driver.get(f"{dashboard_url}/?view=overview")
        wait = WebDriverWait(driver, 120, poll_frequency=0.2)
        header = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".header"))[0]
        style = driver.execute_script(
            "const s = getComputedStyle(arguments[0]); return [s.display, s.backgroundColor, s.color];", header)
        assert style == ["flex", HEADER_BACKGROUND, "rgb(255, 255, 255)"], style
        body_margin = driver.execute_script("return getComputedStyle(document.body).margin")
        assert body_margin == "0px"
        # The overview's figure needs the report, which the dashboard computes with the installed probes.report.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overview-share .main-svg"))
        if os.environ.get("SCREENSHOT"):
            time.sleep(1)  # let Plotly finish its transitions
            driver.save_screenshot(os.environ["SCREENSHOT"])
