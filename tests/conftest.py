"""Shared by the process-level tests: the `slow` marker and helpers that run the command line in a subprocess.

Tests marked `slow` (minutes of CPU: random SIGKILLs of four methods, real signals to real processes) are skipped
unless pytest is given `--slow` or the environment sets RLBOOK_SLOW=1 (CI: `./run test -- --slow`)."""
import os
import sys
from pathlib import Path

import pytest
import torch

CLI = [sys.executable, "-c", "import sys; from rlbook.cli import main; sys.exit(main(sys.argv[1:]))"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # several workers share the cores: one thread each
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: minutes of CPU; run with --slow or RLBOOK_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or os.environ.get("RLBOOK_SLOW") == "1":
        # the long tests first, so that pytest-xdist's workers share them instead of one finishing them alone
        items.sort(key=lambda item: "slow" not in item.keywords)
        return
    skip = pytest.mark.skip(reason="slow: run with --slow or RLBOOK_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def strip(rows):  # metric rows without their wall-clock times
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def weights(path):  # every parameter of the policy saved in a folder, as one flat tensor
    from rlbook.models import load_policy
    m, _ = load_policy(str(path))
    return torch.cat([p.detach().flatten() for p in m.parameters()])
