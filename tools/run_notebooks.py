#!/usr/bin/env python
"""Execute the light cells of notebooks and store their outputs in the notebooks themselves.

    .venv/bin/python tools/run_notebooks.py [nbs/40_grpo.ipynb ...] [--timeout 600] [--dpi 80]

Every code cell runs in one Jupyter kernel per notebook (working directory nbs/, as `nbdev_test`),
except the cells flagged with settings.ini's `tst_flags` (`#| slow`, `#| gpu`) and `#| eval: false`
cells, whose outputs are emptied: their results are committed under data/results/ and the next light
cell draws them. The outputs are written back into the notebook (cell ids, sources and metadata
untouched), then `nbdev_clean` cleans it, so the notebook shows the same printed checks, tables and
figures on GitHub, in Colab and on the website (tools/build_site.py renders the stored outputs and
never executes anything).

Figures are stored as PNG at --dpi (80: modest files, readable on the page); a module's request for
the Agg backend (`matplotlib.use("Agg")`) is ignored in that kernel, so it cannot hide the
notebook's later figures. Widget outputs are dropped (they need a live kernel). A cell that raises
stops the notebook, which is then left as it was. With no argument, every notebook of nbs/ is run.
Prints the run time and the size of the stored outputs per notebook.
"""

import argparse
import configparser
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
SETUP = (
    # the inline backend's settings take effect once pyplot is loaded
    "import matplotlib, matplotlib.pyplot\n"
    # a module that asks for Agg must not make the notebook's later figures vanish
    "_rlbook_use = matplotlib.use\n"
    "matplotlib.use = lambda b, *a, **k: None if str(b).lower() == 'agg' else "
    "_rlbook_use(b, *a, **k)\n"
    "%config InlineBackend.figure_formats = ['png']\n"
    "%config InlineBackend.print_figure_kwargs = {{'bbox_inches': 'tight', 'dpi': {dpi}}}\n"
)
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def skip_flags() -> list:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"].get("tst_flags", "").split()


def skipped(src: str, flags: list) -> bool:
    """A cell the tests skip: `#| slow`, `#| gpu` (settings.ini tst_flags), `#| eval: false`."""
    for ln in src.split("\n"):
        m = re.match(r"^\s*#\|\s*(.*?)\s*$", ln)
        if not m:
            continue
        words = m.group(1).replace(":", " ").split()
        if words and (words[0] in flags or words[:2] == ["eval", "false"]):
            return True
    return False


def clean_outputs(outputs: list) -> list:
    out = []
    for o in outputs:
        o = copy.deepcopy(o)
        if WIDGET_MIME in o.get("data", {}):
            continue  # a widget's view needs its live kernel; its text form says nothing
        o.get("metadata", {}).pop("transient", None)
        out.append(o)
    return out


def run_notebook(
    path: Path, timeout: int = 600, dpi: int = 80, clean: bool = True, verbose: bool = False
) -> dict:
    """Execute `path`'s light cells, store their outputs in it; {secs, cells, skipped, bytes}."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    flags = skip_flags()
    nb = nbformat.read(path, as_version=4)
    work = copy.deepcopy(nb)
    n_skip = 0
    for c in work.cells:
        if c.cell_type == "code" and skipped(c.source, flags):
            c.metadata.setdefault("tags", []).append("skip-execution")
            n_skip += 1
    work.cells.insert(0, nbformat.v4.new_code_cell(SETUP.format(dpi=dpi)))
    env_py = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ["PYTHONPATH"] = (
        env_py  # the kernel inherits it: the notebooks import this checkout's rlbook
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("MPLBACKEND", None)
    client = NotebookClient(
        work,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    if verbose:  # which cell runs now, and how long the last one took
        t_cell = [time.time()]

        def start(cell, cell_index, **kw):
            print(
                f"  cell {cell_index} ({time.time() - t_cell[0]:.1f} s after the previous): "
                f"{cell.source.splitlines()[0][:70] if cell.source else ''}",
                flush=True,
            )
            t_cell[0] = time.time()

        client.on_cell_start = start
    t0 = time.time()
    try:
        client.execute()
    except CellExecutionError as e:
        raise SystemExit(
            f"{path.name}: a cell failed, the notebook is left as it was\n{str(e)[-3000:]}"
        )
    secs = time.time() - t0
    n_run = 0
    for orig, done in zip(nb.cells, work.cells[1:]):
        if orig.cell_type != "code":
            continue
        if "skip-execution" in done.metadata.get("tags", []):
            orig.outputs = []
        else:
            orig.outputs = [nbformat.from_dict(o) for o in clean_outputs(done.outputs)]
            n_run += 1
        orig.execution_count = None
    nbformat.write(nb, path)
    if clean:
        subprocess.run(
            [Path(sys.executable).parent / "nbdev_clean", "--fname", str(path)],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    size = sum(len(json.dumps(c.get("outputs", []))) for c in json.loads(path.read_text())["cells"])
    return {"secs": secs, "cells": n_run, "skipped": n_skip, "bytes": size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "notebooks", nargs="*", help="notebooks to run (default: every notebook of nbs/)"
    )
    ap.add_argument("--timeout", type=int, default=600, help="seconds one cell may run")
    ap.add_argument("--dpi", type=int, default=80, help="resolution of the stored figures")
    ap.add_argument("--no-clean", action="store_true", help="do not run nbdev_clean afterwards")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each cell as it starts")
    a = ap.parse_args(argv)
    paths = [Path(p).resolve() for p in a.notebooks] or sorted(NBS.glob("*.ipynb"))
    for p in paths:
        if not p.is_file() or p.suffix != ".ipynb":
            raise SystemExit(f"run_notebooks: error: {p} is not a notebook")
    total = time.time()
    for p in paths:
        r = run_notebook(p, timeout=a.timeout, dpi=a.dpi, clean=not a.no_clean, verbose=a.verbose)
        print(
            f"{p.name}: {r['cells']} cells run, {r['skipped']} skipped (slow/gpu), "
            f"{r['secs']:.1f} s, "
            f"outputs {r['bytes'] / 1024:.0f} KiB",
            flush=True,
        )
    print(f"{len(paths)} notebooks in {time.time() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
