#!/usr/bin/env python
"""Write README.md from the home page nbs/index.ipynb and the developer page nbs/develop.md.

Without Quarto, which `nbdev_readme` needs.

    .venv/bin/python tools/make_readme.py [--check] [--figures]

The README is the home page followed by the developer page: markdown cells are copied, code cells
become ```python blocks (nbdev `#|` directives removed, `#| hide` cells skipped) followed by their
text outputs; links and images written for nbs/ (`../data/...`, `00_models.ipynb`) are rewritten for
the repository's root. On the website the two are separate pages (the home page for a newcomer,
"Developing rlbook" in the appendices).

`--figures` redraws the home page's two pictures (data/site/chapter_map.svg, the chapter map, and
data/site/grpo_learns.png, held-out accuracy of GRPO runs from data/results/grpo/curves.csv).
`--check` exits 1 if README.md differs from what would be written.
"""

import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
MAP = ROOT / "data" / "site" / "chapter_map.svg"
LEARNS = ROOT / "data" / "site" / "grpo_learns.png"


def for_root(md: str) -> str:
    """Links and images written relative to nbs/ -> relative to the repository's root."""
    md = re.sub(r"(\]\()\.\./", r"\1", md)
    return re.sub(
        r"(\]\()(\d\d_\w+\.ipynb|index\.ipynb|[a-z]+\.md)(#[\w-]+)?\)",
        lambda m: f"{m.group(1)}nbs/{m.group(2)}{m.group(3) or ''})",
        md,
    )


def render_notebook(nb_path: Path) -> list:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            parts.append(for_root(src.strip()))
            continue
        if cell["cell_type"] != "code":
            continue
        lines = src.splitlines()
        directives = [ln.split() for ln in lines if ln.startswith("#|")]
        if any(
            d[1:2] in (["hide"], ["export"], ["exporti"], ["default_exp"])
            for d in directives
            if len(d) > 1
        ):
            continue
        code = "\n".join(ln for ln in lines if not ln.startswith("#|")).strip()
        if code:
            parts.append(f"```python\n{code}\n```")
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain")
            if text:
                parts.append("```\n" + "".join(text).rstrip() + "\n```")
    return parts


def render() -> str:
    parts = render_notebook(NBS / "index.ipynb")
    dev = NBS / "develop.md"
    if dev.is_file():
        parts.append(for_root(dev.read_text(encoding="utf-8").strip()))
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------- the home page's pictures

CHAIN = [  # (label, chapter file, band colour) in the order of the derivation
    ("REINFORCE", "11_reinforce", "#cfe2f3"),
    ("PPO", "14_ppo", "#cfe2f3"),
    ("RLHF", "21_rlhf", "#d9ead3"),
    ("DPO", "30_dpo", "#fce5cd"),
    ("GRPO", "40_grpo", "#f4cccc"),
    ("Nash", "51_nash", "#d9d2e9"),
    ("entropy", "60_entropy", "#fff2cc"),
]


def _text(x, y, s, size=13, fill="#000", bold=False) -> str:
    weight = ' font-weight="bold"' if bold else ""
    return (f'<text x="{x}" y="{y}" text-anchor="middle" font-size="{size}" fill="{fill}"{weight}>'
            f"{s}</text>")


def _box(x, y, w, h, fill, stroke="#555", dash="") -> str:
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="{fill}" '
            f'stroke="{stroke}"{dashes}/>')


def _arrow(x1, y1, x2, y2, dash="") -> str:
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#444" stroke-width="1.5"'
            f'{dashes} marker-end="url(#a)"/>')


NOTES = ["a baseline", "a critic, a clip", "a learned reward", "no reward model", "no critic",
         "no reward at all", "keeps exploring"]


def chapter_map_svg() -> str:
    """The derivation chain of the chapters, the core below, the bands 7x and 8x beside."""
    w, box_w, box_h, gap, x0, y0 = 980, 92, 46, 20, 14, 58
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} 250" width="{w}" height="250" '
        'font-family="Helvetica, Arial, sans-serif" font-size="13">',
        "<title>Chapter map of rlbook: REINFORCE, PPO, RLHF, DPO, GRPO, Nash, entropy, built on "
        "the core chapters; beside them scaling up (7x) and multi-turn agents (8x)</title>",
        '<defs><marker id="a" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>',
        f'<text x="{x0}" y="24" font-size="15" font-weight="bold">The derivation chain: each '
        "method fixes what the one before it leaves open</text>",
    ]
    for i, ((label, f, col), note) in enumerate(zip(CHAIN, NOTES)):
        x = x0 + i * (box_w + gap)
        cx = x + box_w / 2
        out.append(f'<a href="{f}.html">' + _box(x, y0, box_w, box_h, col)
                   + _text(cx, y0 + 20, label, bold=True)
                   + _text(cx, y0 + 37, f"ch. {f[:2]}", size=11, fill="#333") + "</a>")
        out.append(_text(cx, y0 + box_h + 16, note, size=11, fill="#555"))
        if i:
            out.append(_arrow(x - gap + 1, y0 + box_h / 2, x - 2, y0 + box_h / 2))
    chain_w = len(CHAIN) * (box_w + gap) - gap
    yc = 150
    out.append(_box(x0, yc, chain_w, 40, "#e8e8e8")
               + _text(x0 + chain_w / 2, yc + 25, "core, 00–06 and 10: models, tasks, log-probs and KL, "
                       "rollouts, training loop, SFT, preference data, objective"))
    out.append(_arrow(x0 + chain_w / 2, yc, x0 + chain_w / 2, y0 + box_h + 24, dash="3 3"))
    xr = x0 + chain_w + 18
    for j, (band, what, chapters) in enumerate((("7x", "scaling up", "70 data · 71 LoRA · 72 scale"),
                                                ("8x", "multi-turn", "80 agents · 81 turn credit · 82 tool reward"))):
        y, bw = y0 + j * 70, w - xr - 8
        out.append(_box(xr, y, bw, box_h, "#fff", stroke="#999", dash="5 4")
                   + _text(xr + bw / 2, y + 20, f"{band}: {what}", fill="#555")
                   + _text(xr + bw / 2, y + 37, chapters, size=11, fill="#777"))
    out.append(f'<text x="{x0}" y="{yc + 70}" font-size="11" fill="#555">Each box is a chapter '
               "(a notebook and a module of the package); appendices: the Pitfalls, the paper "
               "index, the instructor page.</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def grpo_learns_png(path: Path = LEARNS):
    """Held-out greedy accuracy of GRPO against the training step (3 seeds, mean and each seed),
    from the committed curves of chapter 40's experiment."""
    import matplotlib

    matplotlib.use("Agg")  # a script: no notebook's backend to disturb
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in csv.DictReader(open(ROOT / "data" / "results" / "grpo" / "curves.csv"))
        if r["method"] == "grpo" and r["eval/accuracy"] not in ("", "nan")
    ]
    seeds = sorted({r["seed"] for r in rows})
    fig, ax = plt.subplots(figsize=(5.2, 2.9))
    by_step = {}
    for s in seeds:
        pts = sorted((int(r["step"]), float(r["eval/accuracy"])) for r in rows if r["seed"] == s)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            color="C0",
            alpha=0.3,
            lw=1,
            label="one seed" if s == seeds[0] else None,
        )
        for st, a in pts:
            by_step.setdefault(st, []).append(a)
    steps = sorted(by_step)
    ax.plot(
        steps,
        [sum(by_step[s]) / len(by_step[s]) for s in steps],
        "o-",
        color="C0",
        lw=2,
        ms=4,
        label=f"mean of {len(seeds)} seeds",
    )
    ax.set(
        xlabel="training step (512 sampled answers each)",
        ylabel="held-out accuracy (greedy)",
        title="GRPO on 2–3-digit addition, tiny model, CPU",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)


def main(argv):
    if "--figures" in argv:
        MAP.parent.mkdir(parents=True, exist_ok=True)
        MAP.write_text(chapter_map_svg())
        grpo_learns_png()
        print(f"wrote {MAP.relative_to(ROOT)}, {LEARNS.relative_to(ROOT)}")
    text = render()
    readme = ROOT / "README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text(encoding="utf-8") != text:
            print(
                "README.md does not match nbs/index.ipynb and nbs/develop.md: "
                "run `python tools/make_readme.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    readme.write_text(text, encoding="utf-8")
    print(f"wrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
