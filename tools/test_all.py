#!/usr/bin/env python
"""rlbook's whole test suite (`./run test`).

1. `nbdev_export` and `nbdev_clean` leave no diff: rlbook/ is the notebooks' export, notebooks are clean.
2. README.md is nbs/index.ipynb rendered (tools/make_readme.py).
3. ruff (pyflakes rules: unused imports and variables, undefined names) over rlbook/, tests/, tools/, benchmarks/.
4. pytest on tests/ (over two cores with pytest-xdist where there are two).
5. nbdev's notebook tests (cells flagged slow or gpu are skipped, settings.ini `tst_flags`).
Options: --fast skips the notebook tests; extra arguments after `--` go to pytest.
"""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snapshot() -> dict:
    files = list((ROOT / "rlbook").rglob("*.py")) + list((ROOT / "nbs").rglob("*.ipynb"))
    return {p: p.read_bytes() for p in files if ".ipynb_checkpoints" not in p.parts}


def step(name: str, ok: bool, results: list, detail: str = "") -> None:
    results.append((name, ok))
    print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)


def main(argv):
    fast = "--fast" in argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    t0 = time.time()
    results = []
    passed = failed = 0

    before = snapshot()
    exp = subprocess.run([BIN / "nbdev_export"], cwd=ROOT, capture_output=True, text=True)
    cln = subprocess.run([BIN / "nbdev_clean"], cwd=ROOT, capture_output=True, text=True)
    after = snapshot()
    changed = sorted(str(p.relative_to(ROOT)) for p in set(before) | set(after) if before.get(p) != after.get(p))
    ok = exp.returncode == 0 and cln.returncode == 0 and not changed
    step("nbdev_export and nbdev_clean leave no diff", ok, results,
         "" if ok else (exp.stderr + cln.stderr).strip()[-2000:] + " changed: " + ", ".join(changed))

    rd = subprocess.run([sys.executable, ROOT / "tools" / "make_readme.py", "--check"], cwd=ROOT,
                        capture_output=True, text=True)
    step("README.md matches nbs/index.ipynb", rd.returncode == 0, results, rd.stderr.strip())

    lint = subprocess.run([BIN / "ruff", "check", "--select", "F", "--output-format", "concise", "--no-cache",
                           "rlbook", "tests", "tools", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    step("ruff: no unused imports or undefined names", lint.returncode == 0, results,
         "" if lint.returncode == 0 else (lint.stdout + lint.stderr).strip()[-3000:])

    print("\n== pytest tests/ ==", flush=True)
    # pytest-xdist spreads the tests over the cores (many of them wait on a subprocess); one thread per worker
    workers = min(2, os.cpu_count() or 1) if importlib.util.find_spec("xdist") else 1
    par = (["-n", str(workers), "--dist", "worksteal"] if workers > 1 and not any(a.startswith("-n") for a in extra)
           else [])
    py = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *par, "tests", *extra],
                        cwd=ROOT, capture_output=True, text=True)
    print(py.stdout[-6000:] + py.stderr[-3000:], flush=True)
    m = re.search(r"(\d+) passed", py.stdout)
    f = re.search(r"(\d+) failed", py.stdout)
    e = re.search(r"(\d+) error", py.stdout)
    passed += int(m.group(1)) if m else 0
    failed += (int(f.group(1)) if f else 0) + (int(e.group(1)) if e else 0)
    step("pytest", py.returncode == 0, results)

    if not fast:
        print("\n== notebook tests (nbdev_test; slow and gpu cells skipped) ==", flush=True)
        nbs = sorted(p for p in (ROOT / "nbs").glob("*.ipynb"))
        # two notebooks at a time, one thread each: on 2 cores this beats oversubscribed threads
        nt = subprocess.run([BIN / "nbdev_test", "--n_workers", "2", "--timing"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print((nt.stdout + nt.stderr)[-6000:], flush=True)
        bad = set(re.findall(r"^\t(\S+\.ipynb)$", nt.stdout + nt.stderr, re.M))
        passed += len(nbs) - len(bad)
        failed += len(bad) or (0 if nt.returncode == 0 else 1)
        step(f"notebook tests ({len(nbs)} notebooks)", nt.returncode == 0, results)

    for ok in (results[0][1], results[1][1], results[2][1]):  # the consistency checks and lint count as one test each
        passed, failed = passed + ok, failed + (not ok)
    print(f"\nwall time {time.time() - t0:.0f} s")
    print(f"rlbook: {passed} passed, {failed} failed")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
