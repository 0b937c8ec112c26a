"""The classroom kit: every stub's checker fails on the stub and passes on its solution; the student editions are fresh."""
import ast
import contextlib
import functools
import io

import pytest

from rlbook.classroom import (EXCLUDED, ROOT, base_namespace, chapters, find_exercises, grade, is_stub, run_checks,
                              solutions, stale, stub_functions)


# --- solutions of the exercises -------------------------------------------------------------
def stub_names(src):
    "Top-level functions whose body is only (a docstring and) `raise NotImplementedError`."
    return [node.name for node in ast.parse(src).body if is_stub(node)]


# --- every checker, on its stub and on its solution --------------------------------------------
CASES = [ex for path in chapters().values() for ex in find_exercises(path)]


@functools.lru_cache(maxsize=None)
def base(chapter):
    return base_namespace(chapters()[chapter])


def test_exercises_are_found_in_every_kind_of_chapter():
    kinds = {ex.kind for ex in CASES}
    assert kinds == {"exercise", "implement"}
    assert len({ex.chapter for ex in CASES}) >= 10


@pytest.mark.parametrize("ex", CASES, ids=[f"{ex.chapter}:{ex.label}" for ex in CASES])
def test_checker_fails_on_the_stub_and_passes_on_the_solution(ex):
    if any(f"{ex.chapter}:{n}" in EXCLUDED for n in ex.names):
        pytest.skip(EXCLUDED[next(f"{ex.chapter}:{n}" for n in ex.names if f"{ex.chapter}:{n}" in EXCLUDED)])
    ns = base(ex.chapter)
    status, detail = run_checks(ex, stub_functions(ex, ns), ns)
    assert status != "correct", f"{ex.chapter}: the check of {ex.label} passes on the stub"
    status, detail = run_checks(ex, solutions(ex), ns)
    assert status == "correct", f"{ex.chapter}: the check of {ex.label} says {status} on the solution: {detail}"


CHAPTERS = sorted({ex.chapter for ex in CASES})


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_reference_solutions_are_correct_through_the_grader(chapter, tmp_path):
    "The grader's own path (a worker process, values and gradients sent back): every solution is correct."
    lines = ["import sys", f"sys.path.insert(0, {str(ROOT / 'tests')!r})"]
    for ex in (ex for ex in CASES if ex.chapter == chapter):
        lines.append(f"from {'rlbook.' + ex.module if ex.kind == 'implement' else 'test_' + ex.module} "
                     f"import {', '.join(ex.names)}")
    path = tmp_path / "solutions.py"
    path.write_text("\n".join(lines) + "\n")
    rows = grade(chapter, module=path)
    assert [(ex.label, st) for ex, st, _ in rows] == [(ex.label, "correct") for ex, _, _ in rows], rows


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_untouched_student_edition_is_not_attempted(chapter):
    rows = grade(chapter)
    assert {st for _, st, _ in rows} == {"not attempted"}, rows


def test_student_editions_never_run_long_cells_nor_write_the_book_results():
    "Run All in a student edition skips every slow or gpu cell; those write to my_results/, not ../data/results."
    import json
    from rlbook.classroom import directives, read_cells
    n = 0
    for stem, path in chapters().items():
        edition = ROOT / "student" / f"{stem}.ipynb"
        if not edition.exists():
            continue
        cells = {c.get("id"): c for c in json.loads(edition.read_text())["cells"]}
        flagged = [c for c in read_cells(path) if c["cell_type"] == "code" and {"slow", "gpu"} & set(directives(c["source"]))]
        for c in flagged:
            mine = cells[c["id"]]
            src = "".join(mine["source"])
            if mine["cell_type"] == "code":
                assert src.startswith(("if RUN_SLOW:", "if RUN_GPU:")), f"{stem}: cell {c['id']} runs by default"
                ns = {"RUN_SLOW": False, "RUN_GPU": False}
                exec(compile(src, stem, "exec"), ns)  # switched off: nothing runs, nothing is defined
                assert set(ns) - {"__builtins__"} == {"RUN_SLOW", "RUN_GPU"}
            assert "../data/results" not in src, f"{stem}: cell {c['id']} writes into the book's results"
            n += 1
        if flagged:
            setup = "".join(cells["student-setup"]["source"])
            assert "RUN_SLOW = False" in setup and "RUN_GPU = False" in setup
    assert n >= 20


def test_student_editions_equal_a_fresh_generation():
    bad = stale()
    assert not bad, "student/ is out of date; regenerate it with `rlbook exercises build`: " + ", ".join(bad)


def test_cli_exercises():
    from rlbook.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["exercises", "check", "10_objective"]) == 0  # the untouched student edition
        assert main(["exercises", "check", "10_objective", "--require-all"]) == 1
        assert main(["exercises", "check", "no_such_chapter"]) == 2
        assert main(["exercises", "check", "10", "--notebook", "no/such/file.ipynb"]) == 2
    assert "not attempted" in out.getvalue() and "10_objective: 0 of" in out.getvalue()
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and all(l.startswith("rlbook: error: ") for l in lines) and "Traceback" not in err.getvalue()
    assert "unknown chapter" in lines[0] and "no such file" in lines[1]


def test_a_failing_check_in_a_student_edition_points_at_its_assert_in_jupyter():
    "In a Jupyter kernel, the traceback of a failing self-check shows the failing assert, not an except line."
    import re
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "student" / "40_grpo.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    stub = next(c for c in code if c.source.startswith("# your turn: write group_advantages"))
    chk = next(c for c in code if "if attempted(group_advantages):" in c.source)
    wrong = nbformat.v4.new_code_cell(
        "import torch, math\nfrom rlbook.grpo import batch_std, no_std\n\n"
        "def group_advantages(reward, group_size, scale=None, eps=1e-4):  # forgets the std\n"
        "    return reward - reward.view(-1, group_size).mean(-1).repeat_interleave(group_size)\n")
    imports = nbformat.v4.new_code_cell("import math\nimport torch\nfrom rlbook.grpo import *")
    nb.cells = [imports, stub, chk, wrong, nbformat.v4.new_code_cell(chk.source)]
    nbclient.NotebookClient(nb, allow_errors=True, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "student")}}).execute()
    assert any("group_advantages: not attempted yet" in o.get("text", "") for o in nb.cells[2].outputs)
    err = next(o for o in nb.cells[4].outputs if o.output_type == "error")
    assert err.ename == "AssertionError"
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err.traceback))
    arrow = [l for l in text.splitlines() if l.lstrip().startswith("--->")]
    assert arrow and "assert torch.allclose(A, torch.tensor(naive)" in arrow[-1], arrow
