"""The ipywidgets explorers, live: JupyterLab in headless Chromium, a slider moved, a redraw.

The test starts its own JupyterLab server on 127.0.0.1 (a free port, a random token, no browser,
this checkout's `rlbook` on the kernel's path). For each chapter with an explorer (a code cell that
calls `explore_...()`), it writes a two-cell notebook into a temporary folder (the explorer's import,
from the module the chapter imports it from, `rlbook.explore` (chapter 97), or else from the chapter's
own module, then the chapter's explorer cell verbatim: running the whole chapter would take minutes),
opens it in JupyterLab, runs it, focuses the explorer's first slider and presses the arrow key, and
checks that the printed value line and the figure's pixels changed. The server is stopped in all
cases. Screenshots of the output area before and after go to $RLBOOK_SCREENSHOTS (or a temporary
folder) and their paths are printed.

Needs Chromium and its driver (`apt-get install chromium chromium-driver`; .ci/run installs them):
skipped without them, except in CI (CI=true), where it fails.
"""

import ast
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"


def imported_from(cells: list, name: str):
    """The module `m` of a `from rlbook.m import ..., name, ...` in the cells, or None."""
    for s in cells:
        try:
            tree = ast.parse("\n".join(ln for ln in s.split("\n") if not ln.lstrip().startswith(("%", "!"))))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlbook.")
                    and any(a.name == name for a in node.names)):
                return node.module.split(".", 1)[1]
    return None


def explorer_chapters() -> list:
    """[(notebook, module, explorer cell)] for every chapter whose code calls an `explore_...()`; the module is
    the one the notebook imports the explorer from (`rlbook.explore`), or else the chapter's own."""
    out = []
    for nb in sorted(NBS.glob("[0-9][0-9]_*.ipynb")):
        cells = [
            "".join(c["source"])
            for c in json.loads(nb.read_text())["cells"]
            if c["cell_type"] == "code"
        ]
        module = next(
            (
                m.group(1)
                for s in cells
                for m in [re.search(r"^#\|\s*default_exp\s+(\S+)", s, re.M)]
                if m
            ),
            None,
        )
        calls = [
            s
            for s in cells
            if re.match(r"^\s*explore_\w+\(.*\)\s*;?\s*$", s.strip(), re.S)
            and not s.lstrip().startswith("#|")
        ]
        if module and calls:
            fn = re.match(r"\s*(explore_\w+)", calls[0]).group(1)
            out.append((nb.name, imported_from(cells, fn) or module, calls[0]))
    return out


CHAPTERS = explorer_chapters()


def chromium():
    for b in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(b) and shutil.which("chromedriver"):
            return shutil.which(b), shutil.which("chromedriver")
    msg = "no chromium/chromedriver: apt-get install chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (required in CI)")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab():
    binary, drv = chromium()
    work = Path(tempfile.mkdtemp(prefix="rlbook-widgets-"))
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
        "JUPYTER_CONFIG_DIR": str(work / "config"),
        "JUPYTER_RUNTIME_DIR": str(work / "rt"),
    }
    env.pop("MPLBACKEND", None)
    log = open(work / "jupyter.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={work}",
            "--ServerApp.port_retries=0",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    driver = None
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail("JupyterLab exited:\n" + (work / "jupyter.log").read_text()[-3000:])
                time.sleep(0.5)
        else:
            pytest.fail(
                "JupyterLab did not start in 60 s:\n" + (work / "jupyter.log").read_text()[-3000:]
            )
        os.environ.setdefault("SE_OFFLINE", "true")
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = binary
        for a in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--window-size=1280,1000",
            f"--user-data-dir={work / 'chromium'}",
        ):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(executable_path=drv), options=opts)
        driver.set_page_load_timeout(90)
        shots = Path(os.environ.get("RLBOOK_SCREENSHOTS") or work / "screenshots")
        shots.mkdir(parents=True, exist_ok=True)
        driver.get(f"{base}/lab?token={token}")  # loaded once; each test opens its notebook in it
        wait_for(
            lambda: driver.execute_script(
                "return !!(window.jupyterapp && window.jupyterapp.shell"
                " && document.querySelector('.jp-LabShell'));"
            ),
            90,
            "JupyterLab",
        )
        yield driver, base, token, work, shots
    finally:
        if driver is not None:
            driver.quit()
        if server.poll() is None:  # the server and the kernels it started
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)
        log.close()
        assert server.poll() is not None, "the JupyterLab server is still running"
        if not os.environ.get("RLBOOK_SCREENSHOTS"):
            print(f"\nscreenshots kept under {work / 'screenshots'}")
            for p in (work / "config", work / "rt", work / "chromium"):
                shutil.rmtree(p, ignore_errors=True)


STATE = """
const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
const out = nb && nb.node.querySelector('.jp-Notebook .jp-Cell:last-child .jp-OutputArea');
if (!out) return null;
const img = out.querySelector('img');
return {text: out.innerText, img: img ? img.src.length + ':' + img.src.slice(-64) : null,
        sliders: out.querySelectorAll(
          '.widget-slider .noUi-handle, .widget-slider input[type=range]').length,
        errors: out.querySelectorAll(
          '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]').length};
"""


def wait_for(fn, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def settled(driver, state, quiet=1.0, timeout=30):
    """The output area's state once it has not changed for `quiet` seconds."""
    t0, last, since = time.time(), state, time.time()
    while time.time() - t0 < timeout:
        time.sleep(0.25)
        now = driver.execute_script(STATE)
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet:
            return last
    raise AssertionError(f"the explorer kept redrawing for {timeout} s")


def changed_pixels(png_a: bytes, png_b: bytes) -> int:
    from PIL import Image, ImageChops

    a, b = (Image.open(io.BytesIO(p)).convert("RGB") for p in (png_a, png_b))
    w, h = (
        min(a.size[0], b.size[0]),
        min(a.size[1], b.size[1]),
    )  # the area may differ by a pixel row
    a, b = a.crop((0, 0, w, h)), b.crop((0, 0, w, h))
    return (
        ImageChops.difference(a, b)
        .convert("L")
        .point(lambda p: 255 if p > 16 else 0)
        .histogram()[255]
    )


@pytest.mark.skipif(not CHAPTERS, reason="no chapter has an explorer")
@pytest.mark.parametrize("nb,module,cell", CHAPTERS, ids=[c[0] for c in CHAPTERS])
def test_explorer_redraws_when_a_slider_moves(lab, nb, module, cell):
    import nbformat
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, base, token, work, shots = lab
    name = f"live_{nb}"
    fn = re.match(r"\s*(explore_\w+)", cell).group(1)
    book = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(f"from rlbook.{module} import {fn}"),
            nbformat.v4.new_code_cell(cell),
        ]
    )
    book.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(book, work / name)

    driver.set_script_timeout(60)
    driver.execute_async_script(
        "const done = arguments[1];"
        "window.jupyterapp.commands.execute('docmanager:open', {path: arguments[0]})"
        ".then(() => done(true)).catch((e) => done(String(e)));",
        name,
    )
    wait_for(
        lambda: driver.execute_script(
            "const a = window.jupyterapp; if (!a || !a.shell.currentWidget) return false;"
            "const w = a.shell.currentWidget;"
            "if (!w.context || w.context.path !== arguments[0]) return false;"
            "const k = w.sessionContext; return !!(k && k.session && k.session.kernel"
            " && k.session.kernel.status === 'idle');",
            name,
        ),
        90,
        f"the kernel of {name} to be idle",
    )
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    drawn = wait_for(lambda: (lambda s: s if s and s["img"] and s["sliders"] else None)(
        driver.execute_script(STATE)), 90, f"the explorer of {nb} to draw its figure")
    # a slider may snap its initial value to its step and redraw once: wait until nothing changes
    first = settled(driver, drawn)
    area = driver.execute_script(
        "return window.jupyterapp.shell.currentWidget.node"
        ".querySelector('.jp-Notebook .jp-Cell:last-child .jp-OutputArea');"
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", area)
    time.sleep(0.5)
    before_png = area.screenshot_as_png
    (shots / f"{nb}_before.png").write_bytes(before_png)

    handle = area.find_elements(
        By.CSS_SELECTOR, ".widget-slider .noUi-handle, .widget-slider input[type=range]"
    )[0]
    handle.click()  # focus the first slider
    after = None
    for key in (Keys.ARROW_RIGHT, Keys.ARROW_LEFT):  # the slider may start at its maximum
        for _ in range(3):
            handle.send_keys(key)
        try:
            moved = wait_for(lambda: (lambda s: s if s and s["img"] and s["img"] != first["img"]
                                      and s["text"] != first["text"] else None)(
                driver.execute_script(STATE)), 20, "the figure to be redrawn")
            after = settled(driver, moved)
            break
        except AssertionError:
            continue
    time.sleep(0.5)
    after_png = area.screenshot_as_png
    (shots / f"{nb}_after.png").write_bytes(after_png)
    driver.execute_async_script(  # this notebook's kernel is shut down, its tab closed
        "const done = arguments[0]; const w = window.jupyterapp.shell.currentWidget;"
        "w.sessionContext.shutdown().then(() => { w.dispose(); done(true); })"
        ".catch(() => done(false));"
    )
    assert after, f"{nb}: moving the slider changed neither the printed values nor the figure"
    n = changed_pixels(before_png, after_png)
    print(
        f"\n{nb}: {fn}() redrawn, {n} pixels changed; screenshots {shots / (nb + '_before.png')}, "
        f"{shots / (nb + '_after.png')}"
    )
    assert n > 200, f"{nb}: the output area barely changed ({n} pixels)"
    assert not after["errors"], f"{nb}: the explorer wrote to stderr:\n{after['text'][-1500:]}"
