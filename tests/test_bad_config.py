"""A corpus of bad `rlbook train` flags: each gives exit status 2 and one line on stderr that names the flag,
before any model is built, and nothing is written to disk."""
import contextlib
import io
import json
import os

import functools

import pytest
import torch

import rlbook.cli
from rlbook.cli import main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
NOT_ROOT_SAFE = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (Linux)")

# (flags, the flag the message must name); --out is added by the test, a new folder unless given
CASES = [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-8"], "--batch-size"),
    (["--group-size", "0"], "--group-size"), (["--group-size", "-2"], "--group-size"),
    (["--group-size", "3"], "--group-size"), (["--batch-size", "10", "--group-size", "4"], "--group-size"),
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"),
    (["--grad-accum", "0"], "--grad-accum"), (["--grad-accum", "3"], "--grad-accum"),
    (["--grad-accum", "1024"], "--grad-accum"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "-4"], "--max-new-tokens"),
    (["--eval-n", "0"], "--eval-n"), (["--eval-n", "-10"], "--eval-n"),
    (["--minibatch-size", "-1"], "--minibatch-size"), (["--minibatch-size", "24"], "--minibatch-size"),
    (["--minibatch-size", "1024"], "--minibatch-size"),
    (["--eval-every", "-1"], "--eval-every"), (["--save-every", "-1"], "--save-every"),
    (["--warmup-steps", "-5"], "--warmup-steps"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"),
    (["--lr", "0"], "--lr"), (["--lr=-1e-4"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"),
    (["--lr=-inf"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"), (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--max-grad-norm", "nan"], "--max-grad-norm"), (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--max-grad-norm", "inf"], "--max-grad-norm"),
    (["--temperature", "nan"], "--temperature"), (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--top-p", "-0.1"], "--top-p"),
    (["--device", "tpu"], "--device"), (["--device", "gpu"], "--device"), (["--device", ""], "--device"),
    (["--device", "CPU"], "--device"),
    pytest.param(["--device", "cuda"], "--device", marks=NO_CUDA, id="cuda-without-gpu"),
    pytest.param(["--device", "mps"], "--device", marks=NO_MPS, id="mps-without-mps"),
    (["--mixed-precision", "foo"], "--mixed-precision"), (["--mixed-precision", "FP16"], "--mixed-precision"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "--mixed-precision"),
    pytest.param(["--mixed-precision", "fp16"], "--mixed-precision", marks=NO_CUDA, id="fp16-without-gpu"),
    (["--model", ""], "--model"), (["--model", "  "], "--model"), (["--task", ""], "--task"),
    (["--resume", "--overwrite"], "--resume and --overwrite"),
    # other methods: the same checks, before their setup builds a reference or writes pairs
    (["--method", "sft", "--lr", "nan"], "--lr"), (["--method", "dpo", "--weight-decay", "nan"], "--weight-decay"),
    (["--method", "ppo", "--temperature", "nan"], "--temperature"),
    (["--method", "online_dpo", "--top-p", "0"], "--top-p"),
    (["--method", "rm", "--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--method", "rloo", "--seed", "-1"], "--seed"), (["--method", "spin", "--steps", "0"], "--steps"),
    (["--method", "dapo", "--batch-size", "30", "--group-size", "8"], "--group-size"),
    # TRL's names of the same settings: the message names the flag as given
    (["--num-generations", "0"], "--num-generations"), (["--num-generations", "3"], "--num-generations"),
    (["--generation-batch-size", "10", "--num-generations", "4"], "--num-generations"),
    (["--num-iterations", "0"], "--num-iterations"), (["--gradient-accumulation-steps", "3"], "--gradient-accumulation-steps"),
    (["--learning-rate", "nan"], "--learning-rate"), (["--learning-rate=-1e-4"], "--learning-rate"),
    (["--max-completion-length", "0"], "--max-completion-length"), (["--max-steps", "0"], "--max-steps"),
    (["--max-steps", "3", "--epochs", "2"], "--max-steps"),
    (["--method", "ppo", "--num-ppo-epochs", "0"], "--num-ppo-epochs"),
    (["--method", "ppo", "--response-length", "-1"], "--response-length"),
    (["--model-name-or-path", "  "], "--model-name-or-path"),
]


@pytest.fixture(autouse=True, scope="module")
def fast_parser():
    "build_parser reads every config's source for its help texts (about 1 s); the texts never change within a test run."
    original = rlbook.cli.field_help
    rlbook.cli.field_help = functools.lru_cache(maxsize=None)(original)
    yield
    rlbook.cli.field_help = original


def run_cli(argv):  # (exit status, stderr lines)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, [line for line in err.getvalue().splitlines() if line.strip()]


def assert_one_line(rc, lines, name):
    assert rc == 2, (rc, lines)
    assert len(lines) == 1, lines
    assert lines[0].startswith("rlbook: error: ") and name in lines[0], lines[0]
    assert "Traceback" not in lines[0]


@pytest.mark.parametrize("flags, name", CASES)
def test_bad_flag_is_one_line_and_writes_nothing(flags, name, tmp_path):
    out = tmp_path / "run"
    rc, lines = run_cli(["train", *flags, "--out", str(out), "--no-progress"])
    assert_one_line(rc, lines, name)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def out_cases(tmp_path):  # (label, --out value, the text the message must contain)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    foreign = tmp_path / "foreign"
    (foreign / "checkpoint").mkdir(parents=True)
    (foreign / "checkpoint" / "weights.txt").write_text("someone else's")
    (foreign / "notes.txt").write_text("mine")
    finished = tmp_path / "finished"  # a run folder (metrics and config, no checkpoint)
    finished.mkdir()
    (finished / "config.json").write_text(json.dumps({"steps": 3}))
    (finished / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(4)))
    return [("empty", "", ["--out"]), ("blank", "   ", ["--out"]), ("file", str(a_file), ["--out", "is a file"]),
            ("under-file", str(a_file / "sub"), ["--out", "is a file"]),
            ("unwritable", "/proc/rlbook-no-such/run", ["--out", "cannot write"]),
            ("foreign", str(foreign), ["--out", "not an rlbook run", "notes.txt"]),
            ("run-without-resume", str(finished), ["--out", "already holds a run", "--resume", "--overwrite"]),
            ("resume-without-checkpoint", str(finished), ["--resume", "no usable checkpoint", "--overwrite"])]


OUT_LABELS = ["empty", "blank", "file", "under-file", "unwritable", "foreign", "run-without-resume",
              "resume-without-checkpoint"]


@pytest.mark.parametrize("label", OUT_LABELS)
def test_bad_out_is_one_line_and_loses_nothing(label, tmp_path):
    case = {c[0]: c for c in out_cases(tmp_path)}[label]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    extra = ["--resume"] if label == "resume-without-checkpoint" else []
    rc, lines = run_cli(["train", "--out", case[1], *extra, "--no-progress"])
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rlbook: error: "), (rc, lines)
    for text in case[2]:
        assert text in lines[0], lines[0]
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing removed


@pytest.mark.parametrize("flags, name", [(["--steps", "abc"], "--steps"), (["--lr", "fast"], "--lr"),
                                         (["--batch-size", "1.5"], "--batch-size"),
                                         (["--method", "no-such-method"], "--method")])
def test_unparseable_values_are_argparse_errors(flags, name, tmp_path):
    "argparse refuses values of the wrong type itself: exit status 2, its usage line, then one error line."
    rc, lines = run_cli(["train", *flags, "--out", str(tmp_path / "run")])
    assert rc == 2 and name in lines[-1] and "error:" in lines[-1]
    assert not (tmp_path / "run").exists()
