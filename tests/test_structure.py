"""The book's structure: one notebook exports one module; modules import only earlier chapters; the
Quarto configuration lives at the top level; the book cites only its own pages and the papers."""

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import build_site  # noqa: E402
import cite_book  # noqa: E402
import crossrefs  # noqa: E402

NBS = sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))


def default_exps(nb):
    cells = json.loads(nb.read_text())["cells"]
    src = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return re.findall(r"^#\|\s*default_exp\s+(\S+)", "\n".join(src), re.M)


def test_one_default_exp_per_chapter_and_unique_modules():
    mods = []
    for nb in NBS:
        exps = default_exps(nb)
        assert len(exps) == 1, f"{nb.name} has {len(exps)} default_exp directives"
        mods.append(exps[0])
    assert len(mods) == len(set(mods)), "two notebooks export into one module"


def test_module_names_carry_no_chapter_numbers():
    for nb in NBS:
        assert not re.search(r"\d", default_exps(nb)[0]) or default_exps(nb)[0].startswith("_"), (
            nb.name
        )


def test_modules_import_only_earlier_chapters():
    order = {default_exps(nb)[0]: i for i, nb in enumerate(NBS)}
    importing = 0
    for mod, i in order.items():
        src = (ROOT / "rlbook" / f"{mod}.py").read_text()
        deps = re.findall(r"^\s*from (?:rlbook)?\.(\w+) import", src, re.M)  # nbdev exports relative imports
        importing += bool(deps)
        for dep in deps:
            assert dep in order, f"{mod} imports unknown module {dep}"
            assert order[dep] < i, f"{mod} imports {dep}, a later chapter"
    assert importing > len(order) // 2, "hardly any module imports another: the import pattern has gone stale"


def test_every_chapter_is_in_the_site_sidebar():
    sidebar = yaml.safe_load((ROOT / "_quarto.yml").read_text())["website"]["sidebar"]
    listed = re.findall(r"nbs/([\w.-]+)", json.dumps(sidebar))
    for nb in NBS:
        assert nb.name in listed, f"{nb.name} missing from the sidebar of _quarto.yml"
    for page in ("pitfalls.md", "papers.md", "instructor.md", "index.ipynb"):
        assert page in listed, f"{page} missing from the sidebar of _quarto.yml"


def test_nbs_quarto_is_generated_from_the_top_level_file():
    """nbdev_docs reads nbs/_quarto.yml: it must be _quarto.yml with paths relative to nbs/."""
    top = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    nbs_q = yaml.safe_load((ROOT / "nbs" / "_quarto.yml").read_text())
    assert nbs_q == build_site.nbs_quarto(top), (
        "nbs/_quarto.yml is stale: run `tools/build_site.py --write-pages`"
    )
    assert nbs_q["metadata-files"] == ["nbdev.yml", "sidebar.yml"]
    for f in re.findall(r"'([\w.-]+\.(?:ipynb|md))'", str(nbs_q["website"]["sidebar"])):
        assert (ROOT / "nbs" / f).is_file(), f
    assert build_site.sidebar_pages(ROOT / "_quarto.yml") == build_site.sidebar_pages(
        ROOT / "nbs" / "_quarto.yml"
    )


# documents that are not part of the book: the planning and design notes kept outside the repository
INTERNAL = re.compile(
    r"\b(?:PITFALLS|STYLE)\b|\bMETHODS(?:\.md|,? S\d{3})|\b(?:PITFALLS|METHODS|STYLE)\.md"
)


def book_files():
    here = Path(__file__).name
    yield from sorted((ROOT / "nbs").glob("*.ipynb"))
    yield from sorted((ROOT / "nbs").glob("*.md"))
    yield from sorted((ROOT / "rlbook").glob("*.py"))
    yield from sorted(p for p in (ROOT / "tests").glob("*.py") if p.name != here)
    yield ROOT / "README.md"


def test_the_book_cites_only_itself():
    """No notebook, page, module or test cites a document that is not part of the book; the `.md`
    files that are mentioned exist (pages of nbs/ or files of the repository)."""
    problems = []
    for p in book_files():
        text = p.read_text(encoding="utf-8")
        for m in INTERNAL.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            problems.append(
                f"{p.relative_to(ROOT)}:{line}: cites {m.group(0)!r}, which is not part of the book"
            )
        for m in re.finditer(r"(?<![\w/.-])([\w-]+\.md)\b", text):
            name = m.group(1)
            if not ((ROOT / "nbs" / name).is_file() or (ROOT / name).is_file()):
                problems.append(
                    f"{p.relative_to(ROOT)}: mentions {name}, which is not in the repository"
                )
    assert not problems, "\n".join(problems[:40])


def headings(nb_or_md: Path) -> set:
    """The anchors of a page: its headings' (plain-words headings get the same anchor from Sphinx
    and Quarto) and its explicit labels (`<a id="eq-x"></a>`, `{#eq-x}`)."""
    if nb_or_md.suffix == ".ipynb":
        cells = json.loads(nb_or_md.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    else:
        text = nb_or_md.read_text()
    heads = {
        cite_book.slug(re.sub(r"\s*(\{#[\w-]+\}|<a id=[^>]*></a>)\s*$", "", h))
        for h in re.findall(r"^#{1,6} (.+)$", text, re.M)
    }
    labels = {a or b for a, b in re.findall(r"<a id=\"([\w-]+)\"></a>|\{#([\w-]+)\}", text)}
    return heads | labels


def test_links_to_book_pages_resolve():
    """Every [text](page#anchor) between the book's pages names an existing page and heading."""
    anchors = {}
    problems, n = [], 0
    for p in [*(ROOT / "nbs").glob("*.ipynb"), *(ROOT / "nbs").glob("*.md")]:
        for page, anchor in re.findall(
            r"\]\(((?:\d\d_\w+\.ipynb|[a-z]+\.md))#([\w-]+)\)", p.read_text()
        ):
            n += 1
            target = ROOT / "nbs" / page
            if not target.is_file():
                problems.append(f"{p.name}: link to missing page {page}")
                continue
            if target not in anchors:
                anchors[target] = headings(target)
            if anchor not in anchors[target]:
                problems.append(f"{p.name}: link to {page}#{anchor}, no such heading")
    assert n > 40 and not problems, "\n".join(problems)


def test_pitfalls_page_numbers_and_sections():
    """The entries of the Pitfalls appendix are the numbers tools/cite_book.py links to, and each
    names the chapter section that covers it, a diagnostic and a test."""
    text = (ROOT / "nbs" / "pitfalls.md").read_text()
    entries = re.split(r"^## ", text, flags=re.M)[1:]
    assert [e.split("\n", 1)[0] for e in entries] == [
        f"{n}. {h}" for n, h in cite_book.PITFALLS.items()
    ]
    for e in entries:
        title = e.split("\n", 1)[0]
        assert re.search(r"\]\((?:\d\d_\w+\.ipynb|papers\.md)(?:#[\w-]+)?\)", e), (
            f"{title}: no chapter link"
        )
        for part in (
            "**The mistake.**",
            "**Where it is derived.**",
            "**Diagnostic.**",
            "**Test.**",
        ):
            assert part in e, f"{title}: no {part}"
    for name in re.findall(r"`(tests/test_\w+\.py)::(\w+)`", text):
        path, test = name
        assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), (
            f"{path}::{test} does not exist"
        )


def test_citation_tool_is_idempotent_on_the_pages():
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            src = "".join(c["source"])
            once = cite_book.rewrite(src, c["cell_type"] == "markdown")
            assert cite_book.rewrite(once, c["cell_type"] == "markdown") == once, nb.name


def chapter_numbers(spec: str) -> set:
    """'00–05 (read, run), 14, 20' -> {'00', ..., '05', '14', '20'}"""
    out = set()
    for a, b in re.findall(r"\b(\d\d)(?:\s*[–-]\s*(\d\d))?\b", spec):
        out |= {f"{i:02d}" for i in range(int(a), int(b or a) + 1)}
    return out


def test_instructor_courses_contain_their_prerequisites():
    """Every course of nbs/instructor.md lists the prerequisites (imports, transitively) of each of
    its chapters; a course named after RLHF contains the RLHF chapter; grading is described with
    `rlbook exercises check`."""
    text = (ROOT / "nbs" / "instructor.md").read_text()
    chapters = [
        f
        for _, fs in build_site.sidebar_pages()
        for f in fs
        if f.endswith(".ipynb") and build_site.chapter_facts(f)["module"]
    ]
    facts = {build_site.chapter_facts(f)["module"]: f[:2] for f in chapters}
    direct = {
        f[:2]: {facts[m] for m in build_site.chapter_facts(f)["imports"] if m in facts}
        for f in chapters
    }

    def closure(n, seen=None):
        seen = set() if seen is None else seen
        for d in direct.get(n, ()):
            if d not in seen:
                seen.add(d)
                closure(d, seen)
        return seen

    table = text[text.index("## Three courses") : text.index("## Suggested assignments")]
    courses = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| (\d+) \|$", table, re.M)
    assert len(courses) >= 3
    for name, spec, _ in courses:
        have = chapter_numbers(spec)
        for n in sorted(have):
            missing = closure(n) - have
            assert not missing, (
                f"course {name!r}: chapter {n} needs {sorted(missing)}, which it does not list"
            )
        if "RLHF" in name:
            assert "21" in have, f"course {name!r} has no RLHF chapter"
    grading = text[text.index("## Suggested assignments") :]
    assert "rlbook exercises check" in grading and "nbdev_test" not in grading


def test_crossrefs_written_out_and_read_back():
    labels = {"eq-a": {"x.ipynb": 1}, "eq-b": {"40_y.ipynb": 3}, "sec-s": {"x.ipynb": "Part"}}
    md = (
        "See @eq-a, (@eq-a), @eq-b, @sec-s and `@eq-a`.\n\n$$x = 1$$ {#eq-a}\n\n"
        "* item:\n\n  $$y\n  = 2$$ {#eq-c}\n\n## Part {#sec-s}\n\n```\n@eq-a\n```\n"
    )
    out = crossrefs.write_out(md, "x.ipynb", labels, unknown := set())
    assert out.startswith(
        "See [(1)](#eq-a), [(1)](#eq-a), [(3) in chapter 40](40_y.ipynb#eq-b), [Part](#sec-s) "
        "and `@eq-a`."
    )
    assert '<a id="eq-a"></a>\n\n$$x = 1 \\tag{1}$$' in out and '## Part <a id="sec-s"></a>' in out
    assert (
        '  <a id="eq-c"></a>\n\n  $$y\n  = 2 \\tag{?}$$' in out
    )  # indentation kept; unnumbered: unknown
    assert "```\n@eq-a\n```" in out and unknown == set()
    assert crossrefs.write_out(out, "x.ipynb", labels, set()) == out  # idempotent
    assert crossrefs.to_quarto(out).replace("@eq-a, @eq-a", "@eq-a, (@eq-a)") == md


def test_no_raw_quarto_crossrefs_in_notebooks():
    """Jupyter and the student editions show `{#eq-x}` and `@eq-x` raw: every notebook carries the
    written-out form of tools/crossrefs.py, numbered as the site numbers them."""
    labels = crossrefs.collect([f for _, fs in build_site.sidebar_pages() for f in fs])
    stale = []
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            if c["cell_type"] != "markdown":
                continue
            src = "".join(c["source"])
            if crossrefs.write_out(src, nb.name, labels, set()) != src:
                stale.append(nb.name)
                break
    assert not stale, (
        "raw or stale cross-references: run "
        f"`tools/crossrefs.py {' '.join('nbs/' + s for s in stale)}`"
    )


def test_every_stored_figure_has_a_caption_in_words():
    "A code cell whose stored output is an image carries `#| fig-cap:` with a sentence (Quarto and the site show it)."
    missing = []
    for nb in NBS:
        for c in json.loads(nb.read_text())["cells"]:
            if c["cell_type"] != "code" or not any("image/png" in o.get("data", {}) for o in c.get("outputs", [])):
                continue
            cap = re.search(r"^#\|\s*fig-cap:\s*(.+)$", "".join(c["source"]), re.M)
            if not cap or len(cap.group(1).split()) < 8:
                missing.append(f"{nb.name} cell {c.get('id')}")
    assert not missing, "figures without a caption in words: " + ", ".join(missing)


def test_gpu_and_slow_cells_compile_and_name_what_exists():
    """The cells the suite never runs (flagged gpu or slow) still parse, import only modules that are installed and
    names that rlbook has, and pass `Method.config` only TrainConfig fields: what a reader runs on a GPU is checked here."""
    import ast
    import dataclasses
    import importlib
    import importlib.util

    from rlbook.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for nb in NBS:
        for cell in json.loads(nb.read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] != "code" or not re.search(r"^#\|\s*(gpu|slow)\b", src, re.M):
                continue
            code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))
            tree = ast.parse(code, f"{nb.name}:{cell['id']}")  # a SyntaxError names the notebook and the cell
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module.split(".")[0] == "rlbook":
                        mod = importlib.import_module(node.module)
                        missing = [a.name for a in node.names if not hasattr(mod, a.name)]
                        assert not missing, f"{nb.name}:{cell['id']} imports {missing} from {node.module}, which has none"
                    else:
                        assert importlib.util.find_spec(node.module.split(".")[0]), f"{nb.name}: {node.module} missing"
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        assert importlib.util.find_spec(a.name.split(".")[0]), f"{nb.name}: {a.name} is not installed"
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "config"
                      and isinstance(node.func.value, ast.Name) and node.func.value.id.isupper()):
                    unknown = {k.arg for k in node.keywords if k.arg} - fields
                    assert not unknown, f"{nb.name}:{cell['id']} passes {sorted(unknown)} to {node.func.value.id}.config"
            checked += 1
    assert checked >= 10, checked
