#!/usr/bin/env python
"""Write the book's cross-references so that Jupyter, GitHub, Colab, Quarto and the site read well.

    .venv/bin/python tools/crossrefs.py [nbs/40_grpo.ipynb ...] [--check]

Quarto's syntax (`$$ ... $$ {#eq-x}` under an equation, `@eq-x` in the text, `## Title {#sec-x}`)
shows raw wherever Quarto is absent. In the notebooks it is replaced by what every renderer
understands:

* a labelled equation becomes an HTML anchor and a numbered equation, `<a id="eq-x"></a>` + blank
  line + `$$ ... \\tag{n}$$` (n counts the page's labelled equations in order, as Quarto and the
  offline site number them);
* `@eq-x` / `(@eq-x)` becomes a link `[(n)](#eq-x)`, or `[(n) in chapter NN](NN_name.ipynb#eq-x)`
  for another chapter's equation;
* `## Title {#sec-x}` becomes `## Title <a id="sec-x"></a>` and `@sec-x` a link
  `[Title](page#sec-x)`.

The rewriting is idempotent: a notebook already written this way is read back (`to_quarto`) and
renumbered, so adding an equation and rerunning updates every number and link. tools/build_site.py
reads pages back the same way. References in code (docstrings, comments, inline code) are left
alone. `--check` changes nothing and exits 1 if a notebook would change. Unknown labels are reported
and left as they are.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"

EQ_DEF = re.compile(r"\$\$(?P<body>(?:(?!\$\$).)+?)\$\$[ \t]*\{#(?P<label>eq-[\w-]*\w)\}", re.S)
SEC_DEF = re.compile(r"^(?P<head>#{1,6} .*?)\s*\{#(?P<label>sec-[\w-]*\w)\}[ \t]*$", re.M)
REF = re.compile(r"(\()?(?<![\w@`/])@((?:eq|sec)-[\w-]*\w)(\))?")
# the written-out forms, read back
EQ_OUT = re.compile(
    r"<a id=\"(?P<label>eq-[\w-]*\w)\"></a>[ \t]*\n[ \t]*\n"
    r"(?P<indent>[ \t]*)\$\$(?P<body>(?:(?!\$\$).)+?)"
    r"[ \t]*\\tag\{[^}]*\}[ \t]*\$\$",
    re.S,
)
SEC_OUT = re.compile(r"^(?P<head>#{1,6} .*?) <a id=\"(?P<label>sec-[\w-]*\w)\"></a>[ \t]*$", re.M)
REF_OUT = re.compile(
    r"\[\((?:\d+|\?)\)(?: in chapter \w+)?\]\((?:[\w.-]*)#(eq-[\w-]*\w)\)"
    r"|\[[^\]\n]*\]\((?:[\w.-]*)#(sec-[\w-]*\w)\)"
)


def outside_code(text: str, fn) -> str:
    """Apply fn to the parts of markdown `text` outside fenced blocks and inline code spans."""
    out = []
    for i, block in enumerate(
        re.split(r"(^[ \t]*```.*?^[ \t]*```[ \t]*$)", text, flags=re.M | re.S)
    ):
        if i % 2:
            out.append(block)
            continue
        pos = 0
        for m in re.finditer(r"(`+)(?:.|\n)*?(?<!`)\1(?!`)", block):
            out.append(fn(block[pos : m.start()]))
            out.append(m.group(0))
            pos = m.end()
        out.append(fn(block[pos:]))
    return "".join(out)


def to_quarto(md: str) -> str:
    """The written-out form -> Quarto's (`$$ ... $$ {#eq-x}`, `@eq-x`, `{#sec-x}`).

    Quarto's form is returned unchanged."""

    def back(t):
        # the indentation before the anchor stays: it is the equation's own
        t = EQ_OUT.sub(lambda m: f"$${m.group('body').rstrip()}$$ {{#{m.group('label')}}}", t)
        t = SEC_OUT.sub(lambda m: f"{m.group('head')} {{#{m.group('label')}}}", t)
        return REF_OUT.sub(lambda m: "@" + (m.group(1) or m.group(2)), t)

    return outside_code(md, back)


def page_markdown(f: str) -> list:
    p = NBS / f
    if f.endswith(".ipynb"):
        return [
            "".join(c["source"])
            for c in json.loads(p.read_text())["cells"]
            if c["cell_type"] == "markdown"
        ]
    return [p.read_text()]


def collect(pages: list) -> dict:
    """{label: {page: number or section title}}: equations numbered per page in order of
    definition (a label may be defined on several pages: a reference means its own page's, as in
    Quarto)."""
    labels = {}
    for f in pages:
        n = 0
        for md in page_markdown(f):
            md = to_quarto(md)
            for m in EQ_DEF.finditer(md):
                n += 1
                labels.setdefault(m.group("label"), {}).setdefault(f, n)
            for m in SEC_DEF.finditer(md):
                labels.setdefault(m.group("label"), {}).setdefault(
                    f, re.sub(r"^#+\s*", "", m.group("head"))
                )
    return labels


def write_out(md: str, page: str, labels: dict, unknown: set) -> str:
    """Quarto's form (or the written-out form) -> the written-out form, numbered from `labels`."""
    md = to_quarto(md)

    def fwd(t):
        def eq_def(m):
            label = m.group("label")
            n = labels.get(label, {}).get(page, "?")
            indent = re.search(r"[ \t]*$", t[: m.start()]).group(
                0
            )  # the equation's own indentation
            return f'<a id="{label}"></a>\n\n{indent}$${m.group("body").rstrip()} \\tag{{{n}}}$$'

        t = EQ_DEF.sub(eq_def, t)
        t = SEC_DEF.sub(lambda m: f'{m.group("head")} <a id="{m.group("label")}"></a>', t)

        def ref(m):
            lp, label, rp = m.group(1), m.group(2), m.group(3)
            defs = labels.get(label, {})
            if page in defs:
                where = page
            elif len(defs) == 1:
                where = next(iter(defs))
            else:  # undefined, or defined on several other pages
                unknown.add(label)
                return m.group(0)
            what = defs[where]
            target = "" if where == page else where
            if label.startswith("eq-"):
                text = f"({what})" + ("" if where == page else f" in chapter {where.split('_')[0]}")
                link = f"[{text}]({target}#{label})"
                return link if (lp and rp) else (lp or "") + link + (rp or "")
            return (lp or "") + f"[{what}]({target}#{label})" + (rp or "")

        return REF.sub(ref, t)

    return outside_code(md, fwd)


def book_pages() -> list:
    sys.path.insert(0, str(ROOT / "tools"))
    import build_site

    return [f for _, fs in build_site.sidebar_pages() for f in fs]


def fix_notebook(path: Path, labels: dict, write: bool = True) -> tuple:
    nb = json.loads(path.read_text(encoding="utf-8"))
    changed, unknown = False, set()
    for c in nb["cells"]:
        if c["cell_type"] != "markdown":
            continue
        src = "".join(c["source"])
        new = write_out(src, path.name, labels, unknown)
        if new != src:
            changed = True
            c["source"] = new.splitlines(keepends=True)
    if changed and write:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed, unknown


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "notebooks", nargs="*", help="notebooks to rewrite (default: every notebook of the book)"
    )
    ap.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a notebook would change"
    )
    a = ap.parse_args(argv)
    labels = collect(book_pages())
    paths = [Path(p) for p in a.notebooks] or [
        NBS / f for f in book_pages() if f.endswith(".ipynb")
    ]
    n_changed = 0
    for p in paths:
        changed, unknown = fix_notebook(p, labels, write=not a.check)
        n_changed += changed
        if changed:
            print(f"{'would rewrite' if a.check else 'rewrote'} {p}")
        for u in sorted(unknown):
            print(
                f"{p.name}: warning: @{u} is not defined in any page of the book", file=sys.stderr
            )
    return 1 if a.check and n_changed else 0


if __name__ == "__main__":
    sys.exit(main())
