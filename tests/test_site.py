"""The offline website (tools/build_site.py): it builds, and in headless Chromium every page loads without a
JavaScript error, equations are typeset by the bundled MathJax, images load and internal links resolve.

Chromium and its driver come from Debian (`apt-get install chromium chromium-driver`; .ci/run installs them).
Without them the browser test is skipped, except in CI (CI=true), where it fails.
At 1400 and 400 px wide, every chapter shows at least one stored output, no code block scrolls
sideways, display equations fit the column or scroll on their own, the page itself never scrolls
sideways, and the sidebar opens and closes. Screenshots go to $RLBOOK_SCREENSHOTS or
_site_screenshots/ (git-ignored); their paths are printed."""
import ast
import dataclasses
import functools
import http.server
import importlib
import os
import re
import shutil
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_site  # noqa: E402

SHOTS = Path(os.environ.get("RLBOOK_SCREENSHOTS") or ROOT / "_site_screenshots")
ALLOWED_HOSTS = ("github.com", "colab.research.google.com")  # plain links; nothing a page needs to render


@pytest.fixture(scope="module")
def site():
    tmp = Path(tempfile.mkdtemp(prefix="rlbook-site-"))
    t0 = time.time()
    build_site.build(tmp / "html", tmp / "build", jobs=min(2, os.cpu_count() or 1))
    print(f"\nsite built in {time.time() - t0:.1f} s")
    yield tmp / "html", tmp / "build"
    shutil.rmtree(tmp, ignore_errors=True)


def pages(html: Path) -> list:
    return sorted(p for p in html.rglob("*.html") if "_static" not in p.parts)


# ---------------------------------------------------------------- the build, without a browser


def test_toc_follows_quarto_sidebar(site):
    html, build = site
    toc = yaml.safe_load((build / "book" / "_toc.yml").read_text())
    got = [toc["root"]] + [c["file"] for p in toc["parts"] for c in p["chapters"]]
    want = [f.rsplit(".", 1)[0] for _, fs in build_site.sidebar_pages() for f in fs]
    assert {"pitfalls", "papers", "instructor"} <= set(want)
    assert got == want
    for stem in got:
        assert (html / f"{stem}.html").is_file(), stem


def test_sidebar_picks_up_new_chapters(tmp_path):
    q = tmp_path / "_quarto.yml"
    q.write_text(yaml.safe_dump({"website": {"sidebar": {"contents": [
        "index.ipynb", {"section": "GRPO", "contents": ["40_grpo.ipynb", "60_not_written_yet.ipynb"]},
        {"section": "Core", "contents": [{"href": "00_models.ipynb", "text": "Models"}]}]}}}))
    assert build_site.sidebar_pages(q) == [(None, ["index.ipynb"]), ("GRPO", ["40_grpo.ipynb"]),
                                           ("Core", ["00_models.ipynb"])]


def test_quarto_syntax_is_converted():
    labels = {"eq-a": ["x.ipynb"], "eq-b": ["y.ipynb"], "sec-s": ["x.ipynb"]}
    md = ("## Part {#sec-s}\n\n$$a = 1$$ {#eq-a}\n\nSee @eq-a, (@eq-b), @sec-s and `@eq-a`.\n\n"
          "::: {.callout-note}\nNote this.\n:::\n\n[models](nbs/00_models.ipynb), [tool](../tools/build_site.py)")
    out = build_site.rewrite_markdown(md, labels, "x.ipynb", "https://github.com/o/r", Path("/nonexistent"))
    assert "$$a = 1$$ (x-eq-a)" in out and "(x-sec-s)=\n## Part" in out
    assert "See {eq}`x-eq-a`, {eq}`y-eq-b` in [chapter y](y.ipynb), {ref}`x-sec-s` and `@eq-a`." in out
    assert ":::{note}\nNote this.\n:::" in out
    assert "[models](00_models.ipynb)" in out and "(https://github.com/o/r/blob/main/tools/build_site.py)" in out
    assert build_site.code_cell("#| hide\nx = 1") is None
    assert build_site.code_cell("#| export\ndef f(): pass") == "def f(): pass"


def test_chapter_pages_carry_the_run_box(site):
    html, _ = site
    times = build_site.load_times()
    url = build_site.settings()["git_url"].split("github.com/")[1]
    for _, fs in build_site.sidebar_pages():
        for f in fs:
            if not f.endswith(".ipynb") or not build_site.chapter_facts(f)["module"]:
                continue
            text = (html / f.replace(".ipynb", ".html")).read_text()
            assert f'href="https://colab.research.google.com/github/{url}/blob/main/nbs/{f}"' in text, f
            assert f"jupyter lab nbs/{f}" in text and "./run env" in text, f
            assert "CPU time" in text, f
            if f in times.get("cpu_seconds", {}):
                assert f"{build_site.fmt_secs(times['cpu_seconds'][f])} CPU" in text, f


def test_no_external_scripts_or_styles(site):
    html, _ = site
    tag = re.compile(r"<(script|link|img|iframe|source)\b[^>]*?\b(?:src|href)=\"(https?:)?//([^/\"]+)[^\"]*\"")
    for p in pages(html):
        for kind, _, host in tag.findall(p.read_text()):
            assert False, f"{p.name}: <{kind}> loads from {host}"
        for script in re.findall(r"<script\b[^>]*>(.*?)</script>", p.read_text(), flags=re.S):
            for m in re.finditer(r"\bhttps?://([^/\"' )<]+)", script):  # a URL a script could load
                assert m.group(1).endswith(ALLOWED_HOSTS), (p.name, m.group(0))
    for css in (html / "_static").rglob("*.css"):
        assert not re.search(r"url\(\s*['\"]?(https?:)?//", css.read_text()), css


def test_equations_are_numbered_and_referenced(site):
    html, _ = site
    grpo = (html / "40_grpo.html").read_text()
    assert 'id="equation-40-grpo-eq-grpo-adv"' in grpo
    assert re.search(r'<span class="eqno">\(1\)', grpo)
    assert re.search(r'href="#equation-40-grpo-eq-grpo-loss">\(\d+\)</a>', grpo)  # @eq-grpo-loss
    for p in pages(html):  # every Quarto reference was resolved (the ones left sit in code)
        text = re.sub(r"<pre.*?</pre>|<code.*?</code>", "", p.read_text(), flags=re.S)
        assert not re.search(r"@(eq|sec)-\w", text), p.name


def test_paper_index_values_are_the_code_defaults():
    """Every `module.METHOD.field=value` in nbs/papers.md is the method's default (options, then train defaults)."""
    text = (ROOT / "nbs" / "papers.md").read_text()
    found = re.findall(r"`(\w+)\.([A-Z][A-Z_0-9]*)\.(\w+)=([^`]+)`", text)
    assert len(found) > 20
    from rlbook.train import TrainConfig
    for mod, const, field, value in found:
        method = getattr(importlib.import_module(f"rlbook.{mod}"), const)
        opts = method.options() if isinstance(method.options, type) else method.options
        if opts is not None and field in {f.name for f in dataclasses.fields(opts)}:
            actual = getattr(opts, field)
        elif field in method.defaults:
            actual = method.defaults[field]
        else:
            actual = getattr(TrainConfig(), field)
        want = ast.literal_eval(value)
        assert actual == pytest.approx(want) if isinstance(want, float) else actual == want, \
            f"papers.md says {mod}.{const}.{field}={value}, the code has {actual!r}"


def test_functions_named_in_the_paper_index_exist():
    """Every function or class the paper index names for a paper is exported by the package (a renamed function
    would leave the index pointing at nothing)."""
    import rlbook
    from pathlib import Path as _P
    mods = [importlib.import_module(f"rlbook.{p.stem}") for p in _P(rlbook.__file__).parent.glob("*.py")
            if not p.stem.startswith("_")]
    exported = {n for m in mods for n in getattr(m, "__all__", [])}
    rows = [r for r in (ROOT / "nbs" / "papers.md").read_text().splitlines() if r.startswith("| ") and "ipynb)" in r]
    named = {n for r in rows for n in re.findall(r"`([A-Za-z_]\w*)`", r.split("|")[3])}
    assert len(named) > 40
    missing = sorted(named - exported)
    assert not missing, f"nbs/papers.md names functions the package does not export: {missing}"


# ---------------------------------------------------------------- in a real browser


def chromium():
    for b in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(b):
            drv = shutil.which("chromedriver")
            if drv:
                return shutil.which(b), drv
    msg = "no chromium/chromedriver: apt-get install chromium chromium-driver"
    if os.environ.get("CI") == "true":
        pytest.fail(msg + " (required in CI)")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(site):
    binary, drv = chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    html, _ = site
    handler = functools.partial(QuietHandler, directory=str(html))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp(prefix="rlbook-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=drv), options=opts)
    driver.set_page_load_timeout(60)
    yield driver, f"http://127.0.0.1:{server.server_address[1]}/", html
    driver.quit()
    server.shutdown()
    shutil.rmtree(profile, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


PAGE_STATE = """
const done = arguments[arguments.length - 1];
const mj = window.MathJax && MathJax.startup && MathJax.startup.promise;
(mj || Promise.resolve()).then(() => {
  const imgs = [...document.images];
  const text = [...document.querySelectorAll('article, .bd-article, main')].map(e => {
    const c = e.cloneNode(true); c.querySelectorAll('pre, code, script, style').forEach(x => x.remove());
    return c.innerText; }).join('\\n');
  done({
    mathjax: !!window.MathJax && !!window.MathJax.version, version: window.MathJax && MathJax.version,
    mjx: document.querySelectorAll('mjx-container').length,
    mjxErrors: document.querySelectorAll('mjx-merror, [data-mjx-error]').length,
    mathSpans: document.querySelectorAll('.math').length,
    rawDollars: text.includes('$$'), rawEqRefs: /@eq-\\w/.test(text),
    images: imgs.map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth]),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
  });
}).catch(e => done({error: String(e)}));
"""


def test_every_page_in_the_browser(browser):
    driver, base, html = browser
    driver.set_script_timeout(60)
    ids = {}  # page -> its element ids, for anchors
    problems, n_math_pages, n_images, n_links = [], 0, 0, 0
    all_pages = pages(html)
    for p in all_pages:
        rel = p.relative_to(html).as_posix()
        driver.get(base + rel)
        st = driver.execute_async_script(PAGE_STATE)
        if "error" in st:
            problems.append(f"{rel}: {st['error']}")
            continue
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        problems += [f"{rel}: JS/console error: {m}" for m in errors]
        if st["mathSpans"]:  # Sphinx loads MathJax on the pages with math only
            n_math_pages += 1
            if not st["mathjax"]:
                problems.append(f"{rel}: MathJax did not load")
            if st["mjx"] < st["mathSpans"]:
                problems.append(f"{rel}: {st['mathSpans']} math elements but {st['mjx']} typeset")
        if st["mjxErrors"]:
            problems.append(f"{rel}: {st['mjxErrors']} MathJax errors")
        if st["rawDollars"] or st["rawEqRefs"]:
            problems.append(f"{rel}: raw $$ or @eq- left in the text")
        for src, complete, width in st["images"]:
            n_images += 1
            if not (complete and width > 0):
                problems.append(f"{rel}: image {src} did not load")
        for href in st["links"]:
            u = urlparse(href)
            if u.scheme not in ("http", "https") or not href.startswith(base):
                continue
            n_links += 1
            target = html / unquote(u.path[len(urlparse(base).path):] or "index.html")
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                problems.append(f"{rel}: broken link {href}")
            elif u.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = set(re.findall(r'\bid="([^"]+)"', target.read_text()))
                if unquote(u.fragment) not in ids[target]:
                    problems.append(f"{rel}: link to missing anchor {href}")
    print(f"\n{len(all_pages)} pages, {n_math_pages} with equations, {n_images} images, {n_links} internal links")
    assert not problems, "\n".join(problems[:40])
    assert n_math_pages >= 10 and n_images >= 1 and n_links > 100


def test_screenshot_of_a_chapter(browser):
    driver, base, _ = browser
    driver.set_window_size(1280, 1800)
    driver.get(base + "40_grpo.html")
    driver.execute_async_script("const d = arguments[0]; MathJax.startup.promise.then(() => d(true));")
    SHOTS.mkdir(exist_ok=True)
    out = SHOTS / "40_grpo.png"
    assert driver.save_screenshot(str(out)) and out.stat().st_size > 10_000
    eq = driver.find_element("id", "equation-40-grpo-eq-grpo-adv")  # the first numbered equation
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'}); window.scrollBy(0, -200);", eq)
    out2 = SHOTS / "40_grpo_derivation.png"
    assert driver.save_screenshot(str(out2))
    print(f"\nscreenshots: {out} (title and run box), {out2} (derivation)")


LAYOUT = """
const done = arguments[arguments.length - 1];
const mj = window.MathJax && MathJax.startup && MathJax.startup.promise;
(mj || Promise.resolve()).then(() => {
  const art = document.querySelector('.bd-article') || document.querySelector('main');
  const right = art.getBoundingClientRect().right;
  const codes = [...art.querySelectorAll('div.highlight pre, .cell_output pre')];
  const eqs = [...art.querySelectorAll('div.math')];
  const outputs = [...art.querySelectorAll('.cell_output')].filter(o =>
    o.querySelector('img') || (o.innerText || '').trim().length > 0);
  done({
    codes: codes.length,
    codeOverflow: codes.filter(p => p.scrollWidth > p.clientWidth + 1)
      .map(p => p.innerText.slice(0, 60)),
    eqs: eqs.length,
    eqOutside: eqs.filter(e => e.getBoundingClientRect().right > right + 1).length,
    pageScroll: document.documentElement.scrollWidth - window.innerWidth,
    outputs: outputs.length, figures: art.querySelectorAll('.cell_output img, figure img').length,
    articleWidth: Math.round(art.getBoundingClientRect().width),
  });
}).catch(e => done({error: String(e)}));
"""

SIDEBAR = """
const sb = document.getElementById('pst-primary-sidebar');
const dlg = document.getElementById('pst-primary-sidebar-modal');
const r = sb.getBoundingClientRect();
const links = (dlg && dlg.open ? dlg : sb).querySelectorAll('a.reference.internal').length;
const shown = r.width > 50 && r.right > 50 && getComputedStyle(sb).visibility !== 'hidden'
  && !sb.classList.contains('pst-sidebar-hidden');
return {open: !!(dlg && dlg.open) || shown, modal: !!(dlg && dlg.open), links: links};
"""


MATHJAX_DONE = "const d = arguments[0]; MathJax.startup.promise.then(() => d(true));"


def visible_toggle(driver):
    from selenium.webdriver.common.by import By
    toggles = driver.find_elements(By.CSS_SELECTOR, ".primary-toggle")
    shown = [b for b in toggles if b.is_displayed()]
    assert shown, "no visible sidebar toggle"
    return shown[0]


@pytest.mark.parametrize("width", [1400, 400])
def test_layout_and_outputs(browser, width):
    driver, base, html = browser
    driver.set_script_timeout(60)
    driver.set_window_size(width, 1000)
    time.sleep(0.5)
    chapters = [f for _, fs in build_site.sidebar_pages() for f in fs
                if f.endswith(".ipynb") and build_site.chapter_facts(f)["module"]]
    problems, n_codes, n_eqs = [], 0, 0
    for f in chapters:
        page = f.replace(".ipynb", ".html")
        driver.get(base + page)
        st = driver.execute_async_script(LAYOUT)
        if "error" not in st and st["pageScroll"] > 1:  # once more, after the late images and fonts
            time.sleep(1)
            st = driver.execute_async_script(LAYOUT)
        if "error" in st:
            problems.append(f"{page}: {st['error']}")
            continue
        n_codes, n_eqs = n_codes + st["codes"], n_eqs + st["eqs"]
        at = f"{page} at {width} px"
        if not st["outputs"]:
            problems.append(f"{page}: no rendered output (run tools/run_notebooks.py nbs/{f})")
        if st["codeOverflow"]:
            problems.append(f"{at}: {len(st['codeOverflow'])} code blocks scroll sideways, "
                            f"first: {st['codeOverflow'][0]!r}")
        if st["eqOutside"]:
            problems.append(f"{at}: {st['eqOutside']} display equations stick out of the column")
        if st["pageScroll"] > 1:
            problems.append(f"{at}: the page scrolls sideways by {st['pageScroll']} px")
        if st["articleWidth"] < 0.8 * min(width, 800) - 40:
            problems.append(f"{at}: the text column is only {st['articleWidth']} px wide")
    assert n_codes > 100 and n_eqs > 50, (n_codes, n_eqs)
    assert not problems, "\n".join(problems[:40])


@pytest.mark.parametrize("width", [1400, 400])
def test_sidebar_opens_and_closes(browser, width):
    """The sidebar toggle opens and closes the chapter list; screenshots of chapters."""
    driver, base, html = browser
    driver.set_script_timeout(60)
    driver.set_window_size(width, 1000)
    time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.get(base + "11_reinforce.html")
    driver.execute_async_script(MATHJAX_DONE)
    out = driver.find_elements("css selector", ".cell_output img")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", out)
    time.sleep(0.3)
    shot_out = SHOTS / f"11_reinforce_{width}px_output.png"
    driver.save_screenshot(str(shot_out))
    driver.get(base + "40_grpo.html")
    driver.execute_async_script(MATHJAX_DONE)
    before = driver.execute_script(SIDEBAR)
    shot = SHOTS / f"40_grpo_{width}px.png"
    driver.save_screenshot(str(shot))
    visible_toggle(driver).click()
    time.sleep(0.5)
    toggled = driver.execute_script(SIDEBAR)
    shot_open = SHOTS / f"40_grpo_{width}px_sidebar_toggled.png"
    driver.save_screenshot(str(shot_open))
    assert toggled["open"] != before["open"], f"at {width} px the toggle changed nothing: {before}"
    if toggled["open"]:
        assert toggled["links"] >= 15, toggled  # the chapter list
    if toggled["modal"]:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # the modal closes on Escape
    else:
        visible_toggle(driver).click()
    time.sleep(0.5)
    again = driver.execute_script(SIDEBAR)["open"]
    assert again == before["open"], f"at {width} px the sidebar does not close again"
    print(f"\nscreenshots at {width} px: {shot_out} (chapter 11, a stored figure), "
          f"{shot} (chapter 40), {shot_open} (sidebar toggled)")
