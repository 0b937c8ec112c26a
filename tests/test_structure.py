"""The book's structure: one notebook exports one module; modules import only earlier chapters."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
        assert not re.search(r"\d", default_exps(nb)[0]) or default_exps(nb)[0].startswith("_"), nb.name


def test_modules_import_only_earlier_chapters():
    order = {default_exps(nb)[0]: i for i, nb in enumerate(NBS)}
    for mod, i in order.items():
        src = (ROOT / "rlbook" / f"{mod}.py").read_text()
        for dep in re.findall(r"^\s*from rlbook\.(\w+) import", src, re.M):
            assert dep in order, f"{mod} imports unknown module {dep}"
            assert order[dep] < i, f"{mod} imports {dep}, a later chapter"


def test_every_chapter_is_in_the_site_sidebar():
    sidebar = (ROOT / "nbs" / "_quarto.yml").read_text()
    for nb in NBS:
        assert nb.name in sidebar, f"{nb.name} missing from nbs/_quarto.yml"
    assert not (ROOT / "_quarto.yml").exists(), "keep the Quarto config at nbs/_quarto.yml only"
