#!/usr/bin/env python
"""Rewrite citations of documents that are not part of the book into links to the book's own pages.

    .venv/bin/python tools/cite_book.py [nbs/40_grpo.ipynb ...] [--check]

* "PITFALLS §n" becomes a link to the Pitfalls appendix, `[Pitfalls §n](pitfalls.md#...)`; a bare
  "(§n)" in the same markdown cell links to the same page; in code (docstrings, comments) it becomes
  the plain "Pitfalls §n";
* "METHODS S123" (a paper's entry in a planning list) becomes a link to that paper's section of the
  paper index;
* the few sentences that cite the design notes are rewritten in words (EXACT below).

Notebooks are edited in place (sources only: ids, outputs and metadata untouched). `--check` changes
nothing and exits 1 if a notebook would change. After it, run `nbdev_export` (the docstrings of
exported cells change).
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"

# the headings of nbs/pitfalls.md, by number (their anchors are what Sphinx and Quarto make of them)
PITFALLS = {
    1: "KL estimators and where the KL goes",
    2: "Loss normalisation, length bias and gradient accumulation",
    3: "The loss is zero at the first step",
    4: "Groups with zero reward variance",
    5: "Padding, EOS, truncation and tokenization",
    6: "Memory for the reference model",
    7: "Generation speed and sampler-trainer mismatch",
    8: "Batch sizes and group sizes",
    9: "Running on one small GPU or a CPU",
    10: "Entropy collapse",
    11: "Reading DPO metrics",
    12: "Reward models that do not learn",
    13: "Small models that do not improve",
    14: "Trainers that move or disappear",
    15: "Errata in derivations",
}
# papers cited by their number in a planning list -> the section of nbs/papers.md that has them
PAPER_SECTIONS = {
    "S136": "Actor-critic, PPO and RLHF",
    "S202": "Actor-critic, PPO and RLHF",
    "S214": "Actor-critic, PPO and RLHF",
    "S043": "GRPO and verifiable rewards",
    "S150": "GRPO and verifiable rewards",
    "S161": "GRPO and verifiable rewards",
}
EXACT = [  # (old, new): sentences that cite the design notes
    (" (STYLE, principle 1)", ""),
    (
        "**Deviation from STYLE (principle 5, no `exec`).**",
        '**Deviation from the book\'s rule "no `exec`".**',
    ),
    (
        'the paper\'s own choices (see METHODS, S043, "construction NTP") may differ',
        "the paper's own construction of the implicit negative policy is not transcribed here "
        "and may differ",
    ),
]


def slug(heading: str) -> str:
    """The anchor Sphinx (docutils) and Quarto (pandoc) both give a plain-words heading."""
    s = re.sub(r"^[^A-Za-z]+", "", heading.lower())
    s = re.sub(r"[^\w\s-]", "", s)
    return re.sub(r"[\s_-]+", "-", s).strip("-")


def pitfall_link(n: int) -> str:
    if n not in PITFALLS:
        raise SystemExit(
            f"cite_book: error: Pitfalls §{n} does not exist "
            f"(nbs/pitfalls.md has §1-§{len(PITFALLS)})"
        )
    return f"pitfalls.md#{slug(str(n) + '. ' + PITFALLS[n])}"


def paper_link(s_number: str) -> str:
    if s_number not in PAPER_SECTIONS:
        raise SystemExit(
            f"cite_book: error: no paper-index section known for {s_number}: "
            "add it to PAPER_SECTIONS"
        )
    return f"papers.md#{slug(PAPER_SECTIONS[s_number])}"


def rewrite(src: str, markdown: bool) -> str:
    for old, new in EXACT:
        src = src.replace(old, new)
    if markdown:
        if "PITFALLS §" in src:  # "(§n)" near a "PITFALLS §m" means the same document
            src = re.sub(
                r"(?<![\[\w])§(\d+)(?!\])",
                lambda m: f"[§{m.group(1)}]({pitfall_link(int(m.group(1)))})",
                src,
            )
            src = re.sub(r"PITFALLS \[§(\d+)\]", r"[Pitfalls §\1]", src)
        src = re.sub(
            r"PITFALLS item (\d+)",
            lambda m: f"[Pitfalls §{m.group(1)}]({pitfall_link(int(m.group(1)))})",
            src,
        )
        src = re.sub(
            r"METHODS,? (S\d{3})", lambda m: f"[paper index]({paper_link(m.group(1))})", src
        )
    else:
        src = re.sub(
            r"PITFALLS §(\d+)",
            lambda m: (pitfall_link(int(m.group(1))), f"Pitfalls §{m.group(1)}")[1],
            src,
        )
        src = re.sub(
            r"METHODS,? (S\d{3})", lambda m: (paper_link(m.group(1)), "the paper index")[1], src
        )
    return src


def fix_notebook(path: Path, write: bool = True) -> bool:
    """Rewrite one notebook's citations; True if it changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    changed = False
    for c in nb["cells"]:
        if c["cell_type"] not in ("markdown", "code"):
            continue
        src = "".join(c["source"])
        new = rewrite(src, c["cell_type"] == "markdown")
        if new != src:
            changed = True
            c["source"] = new.splitlines(keepends=True)
    if changed and write:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks (default: every notebook of nbs/)")
    ap.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a notebook would change"
    )
    a = ap.parse_args(argv)
    paths = [Path(p) for p in a.notebooks] or sorted(NBS.glob("*.ipynb"))
    changed = [p for p in paths if fix_notebook(p, write=not a.check)]
    for p in changed:
        print(f"{'would rewrite' if a.check else 'rewrote'} {p}")
    return 1 if a.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
