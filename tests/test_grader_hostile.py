"""Hostile submissions: `rlbook exercises check` grades each one `wrong`, `error` or `not attempted`, never
`correct`; the files outside the worker's scratch folder are untouched; the true solution is still correct."""
import contextlib
import io
import os
import time
from pathlib import Path

import pytest

from rlbook.classroom import ROOT, check

CHAPTER = "10_objective"  # two exercises: optimal_value and beta_for_kl
TIMEOUT = 3.0  # seconds of the student's code per exercise, in these tests
MEMORY_MB = 512

SOLUTION = '''
import math
import torch
from rlbook.objective import categorical_kl, optimal_policy


def optimal_value(ref_logits, reward, beta):
    return beta * torch.logsumexp(ref_logits.log_softmax(-1) + reward / beta, -1)


def beta_for_kl(ref_logits, reward, target_kl, iters=200):
    lo, hi = math.log(1e-6), math.log(1e6)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        kl = categorical_kl(optimal_policy(ref_logits, reward, math.exp(mid)), ref_logits).item()
        lo, hi = (mid, hi) if kl > target_kl else (lo, mid)
    return math.exp(0.5 * (lo + hi))
'''

WRONG = '''
import torch


def optimal_value(ref_logits, reward, beta):
    return torch.zeros(ref_logits.shape[:-1])


def beta_for_kl(ref_logits, reward, target_kl):
    return 1.0
'''


def body(attack: str) -> str:
    "Wrong answers whose optimal_value first runs `attack` (indented into its body)."
    inner = "\n".join("    " + line for line in attack.strip().splitlines())
    return WRONG.replace("def optimal_value(ref_logits, reward, beta):\n",
                         "def optimal_value(ref_logits, reward, beta):\n" + inner + "\n")


@pytest.fixture
def canary(tmp_path):
    "A file of the test's own, outside any scratch folder; a submission must not touch it."
    d = tmp_path / "owned"
    d.mkdir()
    p = d / "canary.txt"
    p.write_text("alive")
    return p


def run(tmp_path, source: str, name: str = "mine.py", **kw) -> tuple:
    "Grade `source` as a module file: (statuses by exercise, printed report, exit status, seconds)."
    path = tmp_path / name
    path.write_text(source)
    out, t0 = io.StringIO(), time.time()
    rc = check(CHAPTER, module=path, require_all=True, file=out, timeout=kw.get("timeout", TIMEOUT),
               memory_mb=MEMORY_MB)
    text = out.getvalue()
    statuses = {}
    for line in text.splitlines():
        for n in ("optimal_value", "beta_for_kl"):
            if line.startswith(n + " "):
                statuses[n] = line[len(n):].strip().split(":")[0]
    return statuses, text, rc, time.time() - t0


def summary(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


def test_true_solution_is_correct(tmp_path):
    st, text, rc, _ = run(tmp_path, SOLUTION)
    assert st == {"optimal_value": "correct", "beta_for_kl": "correct"}, text
    assert rc == 0 and summary(text) == f"{CHAPTER}: 2 of 2 correct, 0 wrong, 0 errors, 0 not attempted"


def test_wrong_answers_are_wrong_with_expected_and_received(tmp_path):
    st, text, rc, _ = run(tmp_path, WRONG)
    assert st == {"optimal_value": "wrong", "beta_for_kl": "wrong"} and rc == 1, text
    assert "received got = tensor([0., 0., 0.]) (shape (3,), float32)" in text
    assert "expected 0.25 * log_partition(ref_, r_, 0.25) = tensor(" in text and "largest |difference|" in text
    assert "last call of your code: optimal_value(tensor(" in text


# each attack sits in optimal_value (which is otherwise wrong); what the report must say about it
ATTACKS = {
    "while_true": ("while True:\n    pass", "timed out: ran for more than 3 s while running your optimal_value"),
    "busy_sleep": ("import time\ntime.sleep(60)", "timed out"),
    "memory_bomb": ("x = [bytearray(2 ** 26) for _ in range(10 ** 4)]", "ran out of memory (MemoryError)"),
    "torch_memory_bomb": ("import torch\nx = torch.empty(2 ** 40)", "raised RuntimeError"),
    "sys_exit": ("import sys\nsys.exit(0)", "called sys.exit(0) while running your optimal_value"),
    "raise_systemexit": ("raise SystemExit(0)", "called sys.exit(0)"),
    "os_exit": ("import os\nos._exit(0)", "ended the grading process (exit status 0"),
    "keyboard_interrupt": ("raise KeyboardInterrupt", "raised KeyboardInterrupt"),
    "segfault": ("import faulthandler\nfaulthandler._sigsegv()", "crashed with signal SIGSEGV"),
    "ctypes_segfault": ("import ctypes\nctypes.string_at(0)", "stopped by the grader: ctypes."),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "stopped by the grader: os.fork is not allowed"),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])", "stopped by the grader: subprocess.Popen"),
    "os_system": ("import os\nos.system('true')", "stopped by the grader: os.system"),
    "raw_fork_exec": ("import _posixsubprocess", "stopped by the grader: importing _posixsubprocess"),
    "kill_the_grader": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "stopped by the grader: os.kill"),
    "raise_limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                     "stopped by the grader: resource.setrlimit"),
    "walk_the_heap": ("import gc\ngc.get_objects()", "stopped by the grader: gc.get_objects"),
    "socket": ("import socket\nsocket.socket()", "stopped by the grader: socket."),
    "cwd_escape": ("import os\nos.chdir('/tmp')\nopen('escaped.txt', 'w')", "stopped by the grader: writing /tmp/escaped.txt"),
    "write_the_grader": (f"open({str(ROOT / 'rlbook' / 'classroom.py')!r}, 'a')",
                         "stopped by the grader: writing " + str(ROOT / "rlbook" / "classroom.py")),
    "exception": ("raise ValueError('nope')", "your optimal_value raised ValueError: nope (mine.py, line 6:"),
    "not_implemented": ("raise NotImplementedError", None),  # graded 'not attempted'
    "garbage_reply": ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'\\xff' * 64)\n"
                      "    except OSError:\n        pass", None),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_in_the_function_is_never_correct(tmp_path, name):
    attack, says = ATTACKS[name]
    # the memory bomb must hit the memory limit, not the clock: on a loaded machine filling 512 MiB can take 3 s
    st, text, rc, seconds = run(tmp_path, body(attack), timeout=30.0 if name == "memory_bomb" else TIMEOUT)
    print(text)
    assert st["optimal_value"] != "correct" and rc == 1, text
    if says is None:
        assert st["optimal_value"] in ("not attempted", "error", "wrong"), text
    else:
        assert st["optimal_value"] == "error" and says in text, text
    assert st["beta_for_kl"] == "wrong", text  # the worker is started again for the next exercise
    assert seconds < 60, seconds


@pytest.mark.parametrize("how", ["import os\nos.remove({p!r})", "import shutil\nshutil.rmtree({d!r})",
                                 "open({p!r}, 'w').write('dead')", "import os\nos.rename({p!r}, 'here.txt')",
                                 "import os\nos.symlink({p!r}, 'link')\nopen('link', 'w')",
                                 "import os\nos.chmod({p!r}, 0)",
                                 "import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.unlink('canary.txt', dir_fd=fd)",
                                 "import pathlib\npathlib.Path({p!r}).unlink()",
                                 "import os\nos.truncate({p!r}, 0)"])
def test_files_outside_the_scratch_folder_are_untouched(tmp_path, canary, how):
    attack = "try:\n" + "\n".join("    " + l for l in how.format(p=str(canary), d=str(canary.parent)).splitlines())
    attack += "\nexcept Exception:\n    pass"  # swallowing the error does not help: the guard stops the worker
    st, text, rc, _ = run(tmp_path, SOLUTION.replace(
        "def optimal_value(ref_logits, reward, beta):\n",
        "def optimal_value(ref_logits, reward, beta):\n" + "\n".join("    " + l for l in attack.splitlines()) + "\n"))
    assert canary.read_text() == "alive" and oct(canary.stat().st_mode)[-3:] != "000", how
    assert st["optimal_value"] == "error" and "stopped by the grader" in text, text
    assert st["beta_for_kl"] == "correct" and rc == 1, text


def test_writing_inside_the_scratch_folder_is_allowed(tmp_path):
    attack = ("import os, pathlib, shutil\npathlib.Path('a/b').mkdir(parents=True)\n"
              "open('a/b/x.txt', 'w').write('ok')\nos.rename('a/b/x.txt', 'a/y.txt')\nshutil.rmtree('a')\n"
              "assert os.path.realpath(pathlib.Path.home()) == os.getcwd()")
    st, text, rc, _ = run(tmp_path, SOLUTION.replace(
        "def optimal_value(ref_logits, reward, beta):\n",
        "def optimal_value(ref_logits, reward, beta):\n" + "\n".join("    " + l for l in attack.splitlines()) + "\n"))
    assert st == {"optimal_value": "correct", "beta_for_kl": "correct"} and rc == 0, text


# attacks at the top of the module: they run while the worker loads it
MODULE_ATTACKS = {
    "patch_run_checks": "import rlbook.classroom as c\nc.run_checks = lambda *a, **k: ('correct', '')\n"
                        "c.check = lambda *a, **k: 0\n",
    "patch_allclose": "import torch\ntorch.allclose = lambda *a, **k: True\ntorch.Tensor.__bool__ = lambda s: True\n",
    "patch_builtins": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"
                      "builtins.AssertionError = type('AssertionError', (Exception,), {})\n",
    "fake_summary": "print('10_objective: 2 of 2 correct, 0 wrong, 0 errors, 0 not attempted')\n"
                    "import sys\nsys.stderr.write('optimal_value  correct\\n\\x1b[2K\\r')\n",
    "fake_result_object": "class Always:\n    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = lambda s, o: True\n"
                          "    __bool__ = lambda s: True\n    __abs__ = __sub__ = __rsub__ = lambda s, *o: s\n",
}


@pytest.mark.parametrize("name", list(MODULE_ATTACKS))
def test_patching_the_grader_changes_nothing(tmp_path, name):
    src = MODULE_ATTACKS[name] + WRONG
    if name == "fake_result_object":
        src = src.replace("return torch.zeros(ref_logits.shape[:-1])", "return Always()").replace(
            "return 1.0", "return Always()")
    st, text, rc, _ = run(tmp_path, src)
    assert "correct" not in st.values() and rc == 1, text
    assert summary(text) == f"{CHAPTER}: 0 of 2 correct, {2 - sum(s == 'error' for s in st.values())} wrong, " \
                            f"{sum(s == 'error' for s in st.values())} error{'s' * (sum(s == 'error' for s in st.values()) != 1)}, 0 not attempted"
    if name == "fake_summary":  # the student's output is shown, prefixed, never as a line of the report
        assert "| 10_objective: 2 of 2 correct" in text and "\x1b" not in text
        assert not any(l.startswith("10_objective: 2 of 2") for l in text.splitlines())
    if name == "fake_result_object":
        assert "cannot compare" in text or "cannot be sent" in text


def test_tensor_subclass_is_received_as_a_plain_tensor(tmp_path):
    src = WRONG.replace("import torch\n", "import torch\n\nclass Liar(torch.Tensor):\n"
                        "    @classmethod\n    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                        "        return True\n").replace("return torch.zeros(ref_logits.shape[:-1])",
                                                          "return torch.zeros(ref_logits.shape[:-1]).as_subclass(Liar)")
    st, text, rc, _ = run(tmp_path, src)
    assert st["optimal_value"] != "correct" and rc == 1, text


def test_reading_the_reference_solution_is_not_stopped(tmp_path):
    "Importing the book's own solutions is not an attack the grader can stop (the code is public): it is correct."
    src = f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom test_objective import optimal_value, beta_for_kl\n"
    st, text, rc, _ = run(tmp_path, src)
    assert st == {"optimal_value": "correct", "beta_for_kl": "correct"} and rc == 0, text


def test_syntax_error_is_an_error_with_its_line(tmp_path):
    st, text, rc, _ = run(tmp_path, SOLUTION.replace("    lo, hi = math.log(1e-6), math.log(1e6)",
                                                     "    lo, hi = math.log(1e-6), math.log(1e6)))"))
    assert st == {"optimal_value": "error", "beta_for_kl": "error"} and rc == 1, text
    assert "syntax error in mine.py, line 12: unmatched ')': `lo, hi = math.log(1e-6), math.log(1e6)))`" in text


def test_syntax_error_in_a_notebook_cell(tmp_path):
    from rlbook.classroom import dumps, student_notebook, chapters
    nb = student_notebook(chapters()[CHAPTER])
    k = next(i for i, c in enumerate(nb["cells"]) if "def optimal_value" in "".join(c["source"]))
    nb["cells"][k]["source"] = ["def optimal_value(ref_logits, reward, beta)\n", "    return 0\n"]
    path = tmp_path / "mine.ipynb"
    path.write_text(dumps(nb))
    out = io.StringIO()
    assert check(CHAPTER, notebook=path, file=out, timeout=TIMEOUT) == 1
    assert f"optimal_value  error: syntax error in your cell {k}, line 1: expected ':'" in out.getvalue()
    assert "beta_for_kl    not attempted" in out.getvalue()


def test_loading_that_hangs_or_exits_is_an_error_for_every_exercise(tmp_path):
    st, text, rc, seconds = run(tmp_path, "while True:\n    pass\n" + SOLUTION)
    assert st == {"optimal_value": "error", "beta_for_kl": "error"} and rc == 1, text
    assert "timed out: ran for more than 3 s while loading mine.py (mine.py, line" in text
    assert seconds < 30
    st, text, rc, _ = run(tmp_path, "import os\nos._exit(0)\n" + SOLUTION)
    assert st == {"optimal_value": "error", "beta_for_kl": "error"} and rc == 1, text


@pytest.mark.parametrize("attack", ["import sys\nsys.exit(0)", "raise SystemExit(0)", "import os\nos._exit(0)"])
def test_cli_exit_code_is_1_with_a_report(tmp_path, attack):
    "Through the command line: an exit of the student's code is an error, with output and exit status 1."
    from rlbook.cli import main
    path = tmp_path / "mine.py"
    path.write_text(body(attack))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["exercises", "check", CHAPTER, "--module", str(path), "--require-all"])
    assert rc == 1 and "optimal_value  error:" in out.getvalue(), out.getvalue()
    assert summary(out.getvalue()).startswith(f"{CHAPTER}: 0 of 2 correct, 1 wrong, 1 error")


@pytest.mark.parametrize("attack, says", [
    ("import os\nos.remove({p!r})", "your code could not be loaded: stopped by the grader: os.remove of {p}"),
    ("import sys\nsys.exit(0)", "loading your code called sys.exit(0) (your cell {k}, line 2: `sys.exit(0)`)"),
    ("import builtins\nbuiltins.print = None\nimport torch\ntorch.allclose = lambda *a, **k: True", "wrong"),
])
def test_attacks_from_a_notebook_cell(tmp_path, canary, attack, says):
    "The same from a student's notebook: the cell that defines the function runs the attack when it is loaded."
    from rlbook.classroom import chapters, dumps, student_notebook
    nb = student_notebook(chapters()[CHAPTER])
    k = next(i for i, c in enumerate(nb["cells"]) if "def optimal_value" in "".join(c["source"]))
    wrong = "def optimal_value(ref_logits, reward, beta):\n    return ref_logits.sum(-1)\n"
    nb["cells"][k]["source"] = [attack.format(p=str(canary)) + "\n\n" + wrong]
    path = tmp_path / "mine.ipynb"
    path.write_text(dumps(nb))
    out = io.StringIO()
    assert check(CHAPTER, notebook=path, file=out, timeout=TIMEOUT, memory_mb=MEMORY_MB) == 1
    text = out.getvalue()
    assert canary.read_text() == "alive", text
    line = next(l for l in text.splitlines() if l.startswith("optimal_value"))
    assert "correct" not in line and says.format(p=canary, k=k) in line, text
    assert "beta_for_kl    not attempted" in text


def test_the_worker_runs_under_its_limits_in_a_scratch_folder(tmp_path):
    "What the student's code sees: rlimits set, cwd = HOME = TMPDIR = a scratch folder, a minimal environment."
    from rlbook.classroom import Submission, StudentFunction, chapters
    src = ("import os, resource, tempfile\n\ndef probe():\n"
           "    r = resource\n"
           "    return [r.getrlimit(r.RLIMIT_AS)[0], r.getrlimit(r.RLIMIT_FSIZE)[0], r.getrlimit(r.RLIMIT_CPU)[0],\n"
           "            r.getrlimit(r.RLIMIT_CORE)[0], r.getrlimit(r.RLIMIT_NPROC)[0], os.getcwd(),\n"
           "            os.path.realpath(os.environ['HOME']), tempfile.gettempdir(), sorted(os.environ)]\n")
    with Submission(chapters()[CHAPTER], [("probe.py", src)], ["probe"], timeout=TIMEOUT, memory_mb=MEMORY_MB,
                    module=True) as sub:
        sub.start()
        as_, fsize, cpu, core, nproc, cwd, home, tmp, env = StudentFunction(sub, "probe")()
        scratch = str(Path(sub.tmp.name).resolve() / "scratch")
    assert 0 < as_ < 64 * 2 ** 30 and fsize == 64 * 2 ** 20 and 0 < cpu < 10 ** 4 and core == 0 and nproc == 0
    assert cwd == home == os.path.realpath(tmp) == scratch
    assert "HOME" in env and "TMPDIR" in env and not {"PYTHONPATH", "USER", "SSH_AUTH_SOCK"} & set(env)
    assert not Path(scratch).exists()  # removed afterwards


@pytest.mark.parametrize("limits", [dict(timeout=0), dict(timeout=float("nan")), dict(timeout=float("inf")),
                                    dict(memory_mb=-1), dict(memory_mb=1.5)])
def test_bad_limits_are_one_clear_error(tmp_path, limits):
    from rlbook.models import RLBookError
    path = tmp_path / "mine.py"
    path.write_text(SOLUTION)
    with pytest.raises(RLBookError, match="^--(timeout|memory-mb) must be"):
        check(CHAPTER, module=path, file=io.StringIO(), **limits)


def test_a_forged_reply_is_an_error(tmp_path):
    "A submission that writes its own reply frames to the grader's pipe only sends data (or garbage): never correct."
    forge = ('import os, struct\n'
             'frames = [b\'{"value": {"$": "tensor", "dtype": "float32", "shape": [3], "data": "AAAA"}}\',\n'
             '          b\'{"value": \' + b"[" * 100000 + b"]" * 100000 + b"}", b\'["not", "an", "object"]\']\n'
             'for fd in range(3, 32):\n'
             '    for data in frames:\n'
             '        try:\n'
             '            os.write(fd, struct.pack(">Q", len(data)) + data)\n'
             '        except OSError:\n'
             '            pass')
    st, text, rc, _ = run(tmp_path, body(forge))
    assert st["optimal_value"] == "error" and "malformed" in text and rc == 1, text
