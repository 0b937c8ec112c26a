#!/usr/bin/env python
"""Build the book's website offline, into one folder of static HTML (Jupyter Book 1.x, MathJax served locally).

    .venv/bin/python tools/build_site.py [--out _site] [--execute no]

The Quarto configuration is the top-level _quarto.yml (`quarto render` builds the site from nbs/);
nbdev's `nbdev_docs` reads nbs/_quarto.yml, generated from it by `--write-pages`. This build needs
no Quarto and no network: the pages, their order and the sections of the table of contents are read
from _quarto.yml's sidebar (chapters and appendices alike). Copies of the notebooks (never the
originals) are preprocessed under --build:

* cross-references written out for plain Jupyter (tools/crossrefs.py) are read back into Quarto's
  syntax, then `$$ ... $$ {#eq-x}` becomes a MyST equation numbered per page, labelled `<page>-eq-x`
  (Quarto's labels are per page, Sphinx's global); `@eq-x` a link "(n)" to it, "(n) in chapter NN"
  to another chapter's; `{#sec-x}` headings become targets and `@sec-x` links;
* Quarto callouts (`::: {.callout-note}`) become admonitions; other Quarto divs lose their wrapper;
* code cells flagged `#| hide` are removed, `#| echo: false` shows a cell's output only, `#| output:
  false` its code only; the other `#|` directive lines are stripped (`#| export` cells stay: they
  are the code the reader reads);
* a markdown image of a committed file, `![caption in words](../data/results/x.png)`, becomes a
  figure with that caption; a committed figure only named in the text (`data/results/x.png`) is
  shown below that paragraph, with the sentence naming it as its caption; `#| fig-cap: ...` captions
  the figure a code cell draws;
* under each `#| slow` / `#| gpu` cell a note says that the page does not run it, which committed
  files its results are in (the next cells draw them) and how to run it;
* links to `nbs/x.ipynb` (the README's form) point to the page, links to other repository files to
  GitHub;
* each chapter gets a box under its title: CPU time of its unflagged cells
  (data/site/cpu_times.json), the commands that run it locally and an "Open in Colab" link.

Notebooks are never executed (`--execute no`, the only mode): pages show the outputs stored in the
notebooks, which `tools/run_notebooks.py` refreshes (it runs the light cells in a kernel), so a
rebuild takes seconds. `--measure-times [NB ...]` re-measures the timing table with `nbdev_test
--timing` (minutes; run it after a chapter changes a lot), `--write-pages` refreshes the generated
table inside nbs/instructor.md and nbs/_quarto.yml.
"""
import argparse
import ast
import configparser
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import crossrefs  # noqa: E402  (written-out cross-references, read back into Quarto's form)

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
TIMES = ROOT / "data" / "site" / "cpu_times.json"
QUARTO = ROOT / "_quarto.yml"  # the source; nbs/_quarto.yml (for nbdev_docs) is generated from it
NBS_QUARTO_HEADER = (
    "# Generated from ../_quarto.yml by `tools/build_site.py --write-pages`: edit that file.\n"
    "# nbdev 2.4's nbdev_docs renders inside nbs/, so the paths here are relative to nbs/.\n")
# MathJax 3 (tex-chtml) from the PyPI wheel sphinx-mathjax-offline: only what tex-chtml loads on demand is copied
MATHJAX_PARTS = ["tex-chtml.js", "input/tex", "output/chtml", "ui", "a11y", "adaptors", "sre/speech-worker.js"]
CALLOUTS = {"note": "note", "tip": "tip", "warning": "warning", "important": "important", "caution": "caution"}


def settings() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return dict(cfg["DEFAULT"])


# ---------------------------------------------------------------- chapter list


def nbs_quarto(top: dict) -> dict:
    """nbs/_quarto.yml from the top-level _quarto.yml: paths relative to nbs/, nbdev's metadata."""
    def rel(v):
        if isinstance(v, str):
            return v[len("nbs/"):] if v.startswith("nbs/") else v
        if isinstance(v, list):
            return [rel(x) for x in v]
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        return v

    q = rel(top)
    project = q.get("project", {})
    q["project"] = {k: v for k, v in project.items() if k not in ("output-dir", "render")}
    q["metadata-files"] = ["nbdev.yml", "sidebar.yml"]
    return q


def write_nbs_quarto() -> Path:
    out = NBS / "_quarto.yml"
    q = nbs_quarto(yaml.safe_load(QUARTO.read_text()))
    out.write_text(NBS_QUARTO_HEADER + "\n"
                   + yaml.safe_dump(q, sort_keys=False, allow_unicode=True, width=1000))
    return out


def sidebar_pages(quarto_yml: Path = QUARTO) -> list:
    """[(section caption or None, [file in nbs/, ...]), ...] in _quarto.yml's sidebar order."""
    q = yaml.safe_load(quarto_yml.read_text())
    sb = q.get("website", {}).get("sidebar", {})
    if isinstance(sb, list):  # several sidebars: the first is the book's
        sb = sb[0]
    parts = []

    def walk(items, caption):
        for it in items or []:
            if isinstance(it, str):
                f = it
            elif isinstance(it, dict) and "section" in it:
                walk(it.get("contents"), it["section"])
                continue
            elif isinstance(it, dict):
                f = it.get("href") or it.get("file") or ""
            else:
                continue
            f = f[len("nbs/"):] if f.startswith("nbs/") else f
            if not (NBS / f).is_file():
                continue  # an external link or a page not written yet
            if not parts or parts[-1][0] != caption:
                parts.append((caption, []))
            parts[-1][1].append(f)

    walk(sb.get("contents"), None)
    return parts


# ---------------------------------------------------------------- markdown rewriting

EQ_LABEL = re.compile(r"\$\$[ \t]*\{#(eq-[\w-]*\w)\}")
SEC_HEAD = re.compile(r"^(#{1,6} .*?)\s*\{#(sec-[\w-]*\w)\}[ \t]*$", re.M)
REF = re.compile(r"(\()?(?<![\w@`/])@((?:eq|sec)-[\w-]*\w)(\))?")
CODE_SPAN = re.compile(r"(`+)(?:.|\n)*?(?<!`)\1(?!`)")


def outside_code(text: str, fn) -> str:
    """Apply fn to the parts of markdown `text` outside fenced blocks and inline code spans."""
    out = []
    for i, block in enumerate(re.split(r"(^```.*?^```[ \t]*$)", text, flags=re.M | re.S)):
        if i % 2:
            out.append(block)
            continue
        pos = 0
        for m in CODE_SPAN.finditer(block):
            out.append(fn(block[pos:m.start()]))
            out.append(m.group(0))
            pos = m.end()
        out.append(fn(block[pos:]))
    return "".join(out)


def convert_callouts(text: str) -> str:
    """Quarto fenced divs -> MyST colon-fence admonitions (callouts) or nothing (other divs)."""
    lines, out, stack = text.split("\n"), [], []
    for line in lines:
        m = re.match(r"^(:{3,})\s*(\{[^}]*\}|[\w-]+)?\s*$", line)
        if m and m.group(2):  # an opening fence
            attrs = m.group(2)
            kind = re.search(r"\.callout-(\w+)", attrs)
            title = re.search(r'title="([^"]*)"', attrs)
            if kind:
                adm = CALLOUTS.get(kind.group(1), "note")
                fence = ":" * max(3, len(m.group(1)))
                out.append(f"{fence}{{{'admonition' if title else adm}}}{' ' + title.group(1) if title else ''}")
                if title:
                    out.append(f":class: {adm}")
                stack.append(fence)
            else:
                stack.append(None)  # a layout div: keep its content, drop the wrapper
        elif m and stack:  # a closing fence
            fence = stack.pop()
            if fence:
                out.append(fence)
        else:
            out.append(line)
    return "\n".join(out)


def rewrite_markdown(src: str, labels: dict, page: str, repo_url: str, fig_dir: Path) -> str:
    if "\x08" in src or "\x0c" in src:  # "\binom" / "\frac" written into the JSON unescaped: backspace, form feed
        print(f"warning: {page}: a control character in a markdown cell (an unescaped \\b or \\f in the "
              f"notebook's JSON), read as TeX's backslash", file=sys.stderr)
        src = src.replace("\x08", "\\b").replace("\x0c", "\\f")
    # `<a id="eq-x"></a> $$ ... \tag{n}$$`, `[(n)](#eq-x)` -> Quarto's syntax
    src = crossrefs.to_quarto(src)
    src = convert_callouts(src)
    # Quarto's labels are per page, Sphinx's global: a label is prefixed with its page's name
    stem = page.rsplit(".", 1)[0]
    src = EQ_LABEL.sub(lambda m: f"$$ ({stem}-{m.group(1)})", src)
    src = SEC_HEAD.sub(lambda m: f"({stem}-{m.group(2)})=\n{m.group(1)}", src)

    def refs(t):
        def one(m):
            label, lp, rp = m.group(2), m.group(1), m.group(3)
            where = labels.get(label, [])
            if page in where:
                target = page  # this page's own label first, as Quarto does
            elif len(where) == 1:
                target = where[0]  # defined once, in another chapter
            else:
                return m.group(0)  # unknown or ambiguous: leave the text as it is (Quarto shows "?@eq-x")
            role = "eq" if label.startswith("eq-") else "ref"
            stem_t = target.rsplit(".", 1)[0]
            r = f"{{{role}}}`{stem_t}-{label}`"
            if role == "eq" and target != page:  # "(n)" alone would read as this page's equation n
                r += f" in [chapter {stem_t.split('_')[0]}]({target})"
            if role == "eq" and lp and rp:  # "(@eq-x)" -> "(n)", not "((n))"
                return r
            return (lp or "") + r + (rp or "")

        t = REF.sub(one, t)

        def link(m):  # [text](target): the README's nbs/ paths, other repository files to GitHub
            text, target = m.group(1), m.group(2)
            if re.match(r"^[a-z]+:|^#|^/", target):
                return m.group(0)
            path, _, anchor = target.partition("#")
            p = (NBS / path).resolve()
            if path.startswith("nbs/"):
                p = (ROOT / path).resolve()
            if p.is_file() and p.parent == NBS and p.suffix in (".ipynb", ".md"):
                return f"[{text}]({p.name}{'#' + anchor if anchor else ''})"
            if p.exists() and ROOT in p.parents:
                return f"[{text}]({repo_url}/blob/main/{p.relative_to(ROOT).as_posix()})"
            return m.group(0)

        return re.sub(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)", link, t)

    src = outside_code(src, refs)

    def figure(rel, caption):
        dest = fig_dir / rel.replace("/", "_")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest)
        cap = " ".join(caption.split()) or "A committed result of this chapter."
        rel_dest = os.path.relpath(dest, fig_dir.parent)
        return f"\n\n```{{figure}} {rel_dest}\n:alt: {cap}\n\n{cap}\n```\n"

    def md_image(m):  # ![caption in words](../data/results/x.png): the notebook's image, a figure
        rel = os.path.normpath(m.group(2)).replace(os.sep, "/").lstrip("./")
        if not (rel.startswith("data/") and (ROOT / rel).is_file()):
            return m.group(0)
        return figure(rel, m.group(1))

    src = re.sub(r"!\[([^\]]*)\]\((?:\.\./)?(data/[\w./-]+\.(?:png|svg|jpg))\)", md_image, src)
    # committed figures named in the text (`data/results/x.png`): the sentence is the caption
    figs = {}
    for m in re.finditer(r"`(data/(?:results|figures)/[\w./-]+\.(?:png|svg|jpg))`", src):
        rel = m.group(1)
        if (ROOT / rel).is_file() and rel not in figs:
            start = max(src.rfind(". ", 0, m.start()), src.rfind("\n", 0, m.start())) + 1
            ends = [i for i in (src.find(". ", m.end()), src.find("\n", m.end())) if i >= 0]
            stop = min(ends or [len(src)])
            sentence = src[start:stop].replace(m.group(0), "").strip(" .:;,(")
            sentence = re.sub(r"\(\s*figure\s*[:;]?\s*", "(", sentence, flags=re.I)
            sentence = re.sub(r"\(\s*[;,]?\s*", "(", sentence).replace("()", "").strip()
            figs[rel] = sentence + "." if sentence else ""
    for rel, cap in figs.items():
        src += figure(rel, cap)
    return src


def collect_labels(pages: list) -> dict:
    """{label: [pages defining it]}"""
    labels = {}
    for f in pages:
        text = (NBS / f).read_text()
        if f.endswith(".ipynb"):
            text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "markdown")
        for lab in re.findall(r"\{#((?:eq|sec)-[\w-]*\w)\}", crossrefs.to_quarto(text)):
            labels.setdefault(lab, []).append(f)
    return labels


# ---------------------------------------------------------------- chapter facts


def load_times() -> dict:
    return json.loads(TIMES.read_text()) if TIMES.is_file() else {}


@functools.lru_cache(maxsize=None)
def chapter_modules() -> dict:
    """{module: notebook file} of the numbered chapters."""
    out = {}
    for nb in sorted(NBS.glob("[0-9][0-9]_*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(c["source"]), re.M)
            if c["cell_type"] == "code" and m:
                out.setdefault(m.group(1), nb.name)
    return out


def chapter_facts(nb_file: str) -> dict:
    """Module, title, subtitle, prerequisites (earlier chapters whose modules its code imports), flagged cells.

    A notebook cell may import a later chapter's module to show something (chapters 10, 14 and 50 draw their
    explorers with chapter 97's `rlbook.explore`); exported code may not, so that import is no prerequisite."""
    nb = json.loads((NBS / nb_file).read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    md = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    module = next((m.group(1) for s in code for m in [re.search(r"^#\|\s*default_exp\s+(\S+)", s, re.M)] if m), None)
    title = next((m.group(1).strip() for s in md for m in [re.search(r"^# (.+)$", s, re.M)] if m), nb_file)
    sub = next((m.group(1).strip() for s in md for m in [re.search(r"^> (.+)$", s, re.M)] if m), "")
    imports = set()
    for s in code:
        imports |= set(re.findall(r"^\s*(?:from|import)\s+rlbook\.(\w+)", s, re.M))
    flagged = sum(bool(re.search(r"^#\|\s*(slow|gpu)\b", s, re.M)) for s in code)
    stubs = [n for s in code if "NotImplementedError" in s for n in stub_functions(s)]
    later = {m for m, f in chapter_modules().items() if f > nb_file}
    return {"file": nb_file, "module": module, "title": title, "subtitle": sub, "imports": imports - {module} - later,
            "flagged": flagged, "stubs": stubs}


def stub_functions(src: str) -> list:
    """Top-level functions of a code cell whose body is only a docstring and `raise NotImplementedError`."""
    src = "\n".join(ln for ln in src.split("\n") if not ln.lstrip().startswith(("#|", "%", "!")))
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    out = []
    for f in tree.body:
        if isinstance(f, ast.FunctionDef) and not f.name.startswith("_"):
            body = [b for b in f.body if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Raise) and "NotImplementedError" in ast.unparse(body[0]):
                out.append(f.name)
    return out


def prerequisites(facts: list) -> dict:
    """{module: its direct imports of other chapters, less those another of them already imports (transitively)}"""
    direct = {f["module"]: f["imports"] for f in facts if f["module"]}

    @functools.lru_cache(maxsize=None)
    def closure(m):
        out = set()
        for d in direct.get(m, ()):
            out |= {d} | closure(d)
        return frozenset(out)

    return {m: {d for d in ds if d in direct and not any(d in closure(o) for o in ds if o != d)}
            for m, ds in direct.items()}


def fmt_secs(s) -> str:
    if s is None:
        return "not measured yet"
    return f"{s} s" if s < 90 else f"{s / 60:.1f} min"


def cpu_time(nb_file: str, times: dict) -> str:
    """The CPU time of a notebook's unflagged cells (the wall times in the table depend on what else ran)."""
    cpu = times.get("cpu_seconds", {}).get(nb_file)
    return "not measured yet" if cpu is None else f"{fmt_secs(cpu)} CPU"


def chapter_box(nb_file: str, facts: dict, times: dict, repo_url: str) -> str:
    flagged = facts["flagged"]
    slow = (f" {flagged} cell{'s' if flagged > 1 else ''} flagged `slow`/`gpu` (the experiments, whose results are "
            f"committed under `data/results/`) are not included: run them with "
            f"`.venv/bin/nbdev_test --path nbs/{nb_file} --flags slow`.") if flagged else ""
    colab = f"https://colab.research.google.com/github/{repo_url.split('github.com/')[-1]}/blob/main/nbs/{nb_file}"
    return f"""```{{admonition}} Run this chapter
:class: tip run-this-chapter

**CPU time:** {cpu_time(nb_file, times)} for the cells the tests run (measured {times.get("date", "")} with `nbdev_test --timing`).{slow}

**Open in Colab:** [nbs/{nb_file} on Colab]({colab})

**Run locally:**

    git clone {repo_url}.git && cd {repo_url.rstrip("/").split("/")[-1]}
    ./run env
    .venv/bin/jupyter lab nbs/{nb_file}
```
"""


# ---------------------------------------------------------------- pages


def flagged_note(nb_file: str, flag: str, src: str, dirs: tuple = ()) -> str:
    """The note under a `#| slow` / `#| gpu` cell: not run here, its results, how to run it.

    The committed files it writes: `../data/results/...` paths in its source, and the file names
    it names (`"x.csv"`) that exist in one of the notebook's result folders `dirs`."""
    where = set(re.findall(r"\.\./(data/results/[\w/.-]*\w)", src))
    for name in re.findall(r"[\"']([\w.-]+\.(?:csv|json|jsonl|png))[\"']", src):
        where |= {f"{d}/{name}" for d in dirs if (ROOT / d / name).is_file()}
    where = sorted(w for w in where if not any(w.startswith(o + "/") for o in where))
    kind = "needs a GPU" if flag == "gpu" else "takes minutes on a CPU"
    files = ", ".join(f"`{w}`" for w in where)
    res = (f" It writes {files} (committed): the figures and tables below are drawn from them."
           if where else " The cells below use what it computes only when it has been run.")
    return f"""```{{admonition}} An experiment cell, not run on this page
:class: note flagged-cell

This cell is flagged `#| {flag}`: it {kind}, so neither the tests nor this page run it.{res}
To rerun it, run the chapter in Jupyter (the flagged cells run there like any other) or
`.venv/bin/nbdev_test --path nbs/{nb_file} --flags {flag}`.
```
"""


def code_cell(src: str):
    """None for a `#| hide` cell, else the source without its `#|` directive lines."""
    lines = src.split("\n")
    dirs = [ln for ln in lines if ln.lstrip().startswith("#|")]
    if any(re.match(r"^\s*#\|\s*hide\b", d) for d in dirs):
        return None
    body = "\n".join(ln for ln in lines if not ln.lstrip().startswith("#|")).strip("\n")
    return body or None


def preprocess_notebook(nb_file: str, dest: Path, labels: dict, times: dict, repo_url: str, chapter: bool):
    nb = json.loads((NBS / nb_file).read_text())
    cells, boxed = [], not chapter
    result_dirs = tuple(sorted(set(re.findall(r"\.\./(data/results/\w+)", (NBS / nb_file).read_text()))))
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "code":
            body = code_cell(src)
            if body is None:
                continue
            # Quarto's `#| echo: false` shows the output only, `#| output: false` the code only
            tags = ["remove-input"] if re.search(r"^#\|\s*echo:\s*false", src, re.M) else []
            meta = {"tags": tags} if tags else {}
            cap = re.search(r"^#\|\s*fig-cap:\s*(.+?)\s*$", src, re.M)
            if cap:  # Quarto's figure caption, for the figure this cell draws
                meta["mystnb"] = {"figure": {"caption": cap.group(1).strip("\"'")}}
            c = {**c, "source": body, "metadata": meta}
            if re.search(r"^#\|\s*output:\s*false", src, re.M):
                c["outputs"] = []
            flag = re.search(r"^#\|\s*(slow|gpu)\b", src, re.M)
            # a widget needs a live kernel (and require.js from a CDN): its outputs are dropped
            c["outputs"] = [o for o in c.get("outputs", [])
                            if not any("widget" in k for k in o.get("data", {}))]
            for o in c["outputs"]:
                if "data" in o:
                    o["data"] = {k: v for k, v in o["data"].items() if "widget" not in k}
                    md = o["data"].get("text/markdown")
                    if md:  # show_doc's markdown opens with a rule, which docutils rejects at a section edge
                        md = "".join(md) if isinstance(md, list) else md
                        o["data"]["text/markdown"] = re.sub(r"^\s*---\s*\n", "", md)
            cells.append(c)
            if flag:
                cells.append({"cell_type": "markdown", "metadata": {},
                              "source": flagged_note(nb_file, flag.group(1), src, result_dirs)})
            continue
        if c["cell_type"] != "markdown":
            continue
        src = rewrite_markdown(src, labels, nb_file, repo_url, dest.parent / "figures")
        if not boxed and re.search(r"^# ", src, re.M):
            # split after the title and its `>` subtitle, put the box there
            m = re.search(r"^# .*\n(?:\s*\n)*(?:>.*\n?)*", src, re.M)
            head, rest = src[:m.end()], src[m.end():]
            cells.append({"cell_type": "markdown", "metadata": {}, "source": head.rstrip("\n")})
            cells.append({"cell_type": "markdown", "metadata": {},
                          "source": chapter_box(nb_file, chapter_facts(nb_file), times, repo_url)})
            boxed = True
            src = rest.strip("\n")
            if not src:
                continue
        cells.append({"cell_type": "markdown", "metadata": {}, "source": src})
    for i, c in enumerate(cells):
        c["id"] = c.get("id") or f"site-{i}"
    nb["cells"] = cells
    nb["metadata"] = {"kernelspec": nb.get("metadata", {}).get("kernelspec",
                                                                  {"name": "python3", "display_name": "python3",
                                                                   "language": "python"})}
    dest.write_text(json.dumps(nb, indent=1))


def chapters_table(chapters: list, times: dict) -> str:
    facts = [chapter_facts(f) for f in chapters]
    by_module = {f["module"]: f for f in facts if f["module"]}
    pre_of = prerequisites(facts)
    rows = ["| # | chapter | module | prerequisites | CPU time | slow/gpu cells | "
            "code exercises |", "|---|---|---|---|---|---|---|"]
    total = 0
    for f in facts:
        pre = ", ".join(f"[{by_module[m]['file'].split('_')[0]}]({by_module[m]['file']})"
                        for m in sorted(pre_of.get(f["module"], ()), key=lambda m: by_module[m]["file"])) or "—"
        total += times.get("cpu_seconds", {}).get(f["file"]) or 0
        rows.append(f"| {f['file'].split('_')[0]} | [{f['title']}]({f['file']}) | `rlbook.{f['module']}` | {pre} | "
                    f"{cpu_time(f['file'], times)} | {f['flagged'] or '—'} | "
                    f"{', '.join(f'`{n}`' for n in f['stubs']) or '—'} |")
    rows.append(f"\nTotal CPU time of the cells the tests run: {fmt_secs(total)} "
                f"(`{times.get('measured_with', 'nbdev_test --timing')}`, {times.get('date', 'not measured yet')}).")
    return "\n".join(rows)


GENERATED = re.compile(r"(<!-- begin generated: (\w+) -->\n).*?(<!-- end generated -->)", re.S)


def fill_generated(text: str, chapters: list, times: dict) -> str:
    """Replace the <!-- begin generated: NAME --> ... <!-- end generated --> blocks of a Markdown page."""
    gens = {"chapters": lambda: chapters_table(chapters, times)}
    return GENERATED.sub(lambda m: m.group(1) + gens[m.group(2)]() + "\n" + m.group(3), text)


# ---------------------------------------------------------------- build


def copy_mathjax(static: Path):
    src = Path(metadata.distribution("sphinx-mathjax-offline").locate_file("sphinx-mathjax-offline/static/mathjax"))
    for part in MATHJAX_PARTS:
        s, d = src / part, static / "mathjax" / part
        if s.is_dir():
            shutil.copytree(s, d, dirs_exist_ok=True)
        elif s.is_file():
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)


SITE_CSS = """\
.run-this-chapter pre { font-size: 0.85em; }
.admonition.run-this-chapter p { margin-bottom: 0.4em; }
/* the paper index and the chapter tables are wide */
.bd-main .bd-content .bd-article-container { max-width: 75em; }
.bd-article table { font-size: 0.85em; }
/* a wide table scrolls on its own (its cells wrap first), the page does not */
.bd-article table { display: block; max-width: 100%; overflow-x: auto; }
.bd-article td, .bd-article th { overflow-wrap: anywhere; }
.bd-article code.literal, .bd-article code.literal span.pre { white-space: normal; overflow-wrap: anywhere; }
/* code and printed outputs wrap at the column instead of scrolling sideways */
.bd-article div.highlight pre, .bd-article .cell_output pre, .bd-article pre {
  white-space: pre-wrap; overflow-wrap: anywhere; word-break: normal; }
/* a display equation wider than the column scrolls on its own, the page does not */
.bd-article div.math, .bd-article mjx-container[display="true"] {
  max-width: 100%; overflow-x: auto; overflow-y: hidden; }
.bd-article .cell_output img { max-width: 100%; height: auto; }
.bd-article figure img, .bd-article .figure img { max-width: 100%; height: auto; }
@media (max-width: 600px) {
  .bd-article { padding-left: 0.25rem; padding-right: 0.25rem; }
  .bd-main .bd-content .bd-article-container { padding-left: 0.5rem; padding-right: 0.5rem; }
  .bd-article pre { font-size: 0.8em; }
}
"""

# sphinx-book-theme 1.3 puts its own sidebar buttons in the article header, but
# pydata-sphinx-theme 0.17 binds its handlers to the first `.primary-toggle` /
# `.secondary-toggle` of the page only (one in the navbar, hidden by the book theme): a click on
# any other toggle is forwarded to that first one.
SITE_JS = """\
document.addEventListener("DOMContentLoaded", () => {
  for (const kind of ["primary", "secondary"]) {
    const all = [...document.querySelectorAll(`.${kind}-toggle`)];
    all.slice(1).forEach((b) => b.addEventListener("click", (e) => {
      e.preventDefault(); e.stopPropagation(); all[0].click();
    }));
  }
});
"""


def write_book(build: Path, parts: list, times: dict) -> Path:
    cfg = settings()
    repo_url = cfg["git_url"].rstrip("/")
    book = build / "book"
    if book.exists():
        shutil.rmtree(book)
    (book / "_static").mkdir(parents=True)
    all_pages = [f for _, fs in parts for f in fs]
    chapters = [f for f in all_pages if f.endswith(".ipynb") and chapter_facts(f)["module"]]
    labels = collect_labels(all_pages)

    for f in all_pages:
        dest = book / f
        if f.endswith(".ipynb"):
            preprocess_notebook(f, dest, labels, times, repo_url, chapter=f in chapters)
        else:
            text = fill_generated((NBS / f).read_text(), chapters, times)
            dest.write_text(rewrite_markdown(text, labels, f, repo_url, book / "figures"))
    if (NBS / "styles.css").is_file():
        shutil.copy2(NBS / "styles.css", book / "_static" / "styles.css")
    (book / "favicon.svg").write_text(  # without one, every page logs a 404 for /favicon.ico
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" '
        'fill="#2c3e50"/><text x="16" y="22" font-size="15" text-anchor="middle" fill="#fff" '
        'font-family="sans-serif">rl</text></svg>\n')
    (book / "_static" / "site.css").write_text(SITE_CSS)
    (book / "_static" / "site.js").write_text(SITE_JS)

    stem = lambda f: f.rsplit(".", 1)[0]
    root = all_pages[0]
    toc_parts = []
    for cap, fs in parts:
        fs = [f for f in fs if f != root]
        if fs:
            toc_parts.append({**({"caption": cap} if cap else {}), "chapters": [{"file": stem(f)} for f in fs]})
    toc = {"format": "jb-book", "root": stem(root), "parts": toc_parts}
    (book / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))

    config = {
        "title": cfg.get("title", "rlbook"),
        "author": cfg.get("author", ""),
        "copyright": cfg.get("copyright", ""),
        "only_build_toc_files": True,
        "execute": {"execute_notebooks": "off"},
        "repository": {"url": repo_url, "branch": "main", "path_to_book": "nbs"},
        "html": {"use_repository_button": True, "use_issues_button": False, "use_edit_page_button": False,
                 "use_multitoc_numbering": False, "home_page_in_navbar": True, "extra_footer": ""},
        "launch_buttons": {"notebook_interface": "classic", "binderhub_url": "", "colab_url": "", "thebe": False},
        "parse": {"myst_enable_extensions": ["amsmath", "colon_fence", "dollarmath", "deflist", "linkify",
                                             "substitution", "tasklist"],
                  "myst_dmath_double_inline": True},
        "sphinx": {"config": {
            "mathjax_path": "mathjax/tex-chtml.js",
            "html_copy_source": False,
            "math_numfig": False,  # per page, as Quarto: numfig would number across the book
            "suppress_warnings": ["myst.header", "mystnb.unknown_mime_type"],
            "html_favicon": "favicon.svg",
            "html_context": {"default_mode": "light"},  # pydata-sphinx-theme logs an error without one
            "html_theme_options": {"use_download_button": False, "use_fullscreen_button": False,
                                   "repository_url": repo_url, "repository_branch": "main",
                                   "path_to_docs": "nbs", "use_repository_button": True,
                                   "launch_buttons": {}},
            "nb_ipywidgets_js": {},
        }},
    }
    (book / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return book


def build(out: Path, build_dir: Path, jobs: int = 1, quiet: bool = True) -> float:
    t0 = time.time()
    times = load_times()
    book = write_book(build_dir, sidebar_pages(), times)
    bin_dir = Path(sys.executable).parent
    # jupyter-book writes conf.py from _config.yml; sphinx-build then builds (in parallel with -j)
    subprocess.run([bin_dir / "jupyter-book", "config", "sphinx", str(book)], check=True, capture_output=True)
    conf = book / "conf.py"  # sphinx_thebe only names a CDN script (live code cells need a server anyway)
    conf.write_text(conf.read_text().replace("'sphinx_thebe', ", ""))
    html = build_dir / "html"
    if html.exists():
        shutil.rmtree(html)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-j", str(jobs), "-d", str(build_dir / "doctrees"),
           str(book), str(html)] + (["-q"] if quiet else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    warnings = [ln for ln in (r.stdout + r.stderr).splitlines() if "WARNING" in ln or "ERROR" in ln]
    if warnings:
        print("\n".join(warnings[:50]), file=sys.stderr)
    if r.returncode != 0:
        print(r.stdout[-3000:] + r.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"sphinx-build failed ({r.returncode})")
    # MathJax is copied after the build: Jupyter Book would load every .js file of a static path on every page
    copy_mathjax(html / "_static")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(html, out, ignore=shutil.ignore_patterns(".buildinfo", ".doctrees"))
    return time.time() - t0


def measure_times(pages=None) -> dict:
    """Time each chapter's unflagged cells: `nbdev_test --path nbs/<nb> --timing`, one notebook at a time.

    Records the process's CPU time (user + sys, all threads: what a laptop has to supply, and not inflated when
    other jobs share the machine) and nbdev_test's wall time of the cells on this machine."""
    import resource
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    old = json.loads(TIMES.read_text()) if TIMES.is_file() else {}
    cpu, wall = dict(old.get("cpu_seconds", {})), dict(old.get("wall_seconds", {}))
    pages = pages or [f for _, fs in sidebar_pages() for f in fs if f.endswith(".ipynb")]
    for f in pages:
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([bin_dir / "nbdev_test", "--path", f"nbs/{f}", "--n_workers", "1", "--timing"], cwd=ROOT,
                           capture_output=True, text=True, env=env)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        m = re.search(r"^(\S+\.ipynb): (\d+) secs$", r.stdout + r.stderr, re.M)
        if r.returncode != 0 or not m:
            print(f"{f}: failed, not timed\n" + (r.stdout + r.stderr)[-1500:], file=sys.stderr)
            continue
        cpu[f] = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        wall[f] = int(m.group(2))
        print(f"{f}: {cpu[f]} s CPU, {wall[f]} s wall", flush=True)
    data = {"note": "the pages show cpu_seconds (user + system time of the nbdev_test process); wall_seconds "
                    "depend on what else the machine ran",
            "measured_with": f"nbdev_test --path nbs/<nb> --timing, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}",
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "cpu_seconds": dict(sorted(cpu.items())), "wall_seconds": dict(sorted(wall.items()))}
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="_site", help="output folder of static HTML")
    ap.add_argument("--build", default="_build_site", help="work folder (generated book, doctrees)")
    ap.add_argument("--execute", default="no", choices=["no"], help="notebooks are never executed")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="sphinx-build processes")
    ap.add_argument("--measure-times", nargs="*", metavar="NB",
                    help="re-measure data/site/cpu_times.json (all chapters, or the notebooks named) and exit")
    ap.add_argument("--write-pages", action="store_true",
                    help="refresh the generated tables inside nbs/instructor.md and "
                         "nbs/_quarto.yml (for the Quarto site) and exit")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.measure_times is not None:
        measure_times(a.measure_times)
        return 0
    if a.write_pages:
        chapters = [f for _, fs in sidebar_pages() for f in fs if f.endswith(".ipynb") and chapter_facts(f)["module"]]
        for f in [f for _, fs in sidebar_pages() for f in fs if f.endswith(".md")]:
            p = NBS / f
            if p.is_file() and GENERATED.search(p.read_text()):
                p.write_text(fill_generated(p.read_text(), chapters, load_times()))
                print(f"refreshed {p.relative_to(ROOT)}")
        print(f"wrote {write_nbs_quarto().relative_to(ROOT)} from _quarto.yml")
        return 0
    out, bdir = (Path(p) if Path(p).is_absolute() else ROOT / p for p in (a.out, a.build))
    secs = build(out, bdir, jobs=a.jobs, quiet=not a.verbose)
    print(f"site built in {secs:.0f} s: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
