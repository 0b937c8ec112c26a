"""`rlbook train --help` and `rlbook train --method M --help`: the shared flags with the method's defaults, the
method's own options with its defaults and meanings (`Method.option_help` where it has one), TRL's names beside
the book's flags, and nothing of another method."""
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rlbook.cli as cli
from rlbook.cli import ALIASES, METHODS, main, train_help
from rlbook.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [f.name for f in dataclasses.fields(TrainConfig)]
WIDE = 200  # columns: each flag's help on few lines


def flag(name):
    return "--" + name.replace("_", "-")


def run_help(argv):  # (exit status, stdout, stderr) of `rlbook train ARGV --help`
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", *argv, "--help"])
    return rc, out.getvalue(), err.getvalue()


def entries(text):  # invocation ('--lr X, --learning-rate X') -> its help, continuation lines joined
    out, key = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            key, _, rest = line[2:].partition("  ")
            out[key] = rest.strip()
        elif key and line.startswith("    "):
            out[key] = (out[key] + " " + line.strip()).strip()
        else:
            key = None
    return out


def flags_of(invocation):
    return set(re.findall(r"--[\w-]+", invocation))


def split(name):  # (shared entries, own entries) of a method's help
    shared, _, own = train_help(name, width=WIDE).partition(f"{name}'s own options")
    return entries(shared), entries(own)


def entry(table, book_flag):  # (invocation, help) of the entry that spells this flag
    return next((k, h) for k, h in table.items() if book_flag in flags_of(k))


def test_general_help_lists_the_shared_flags_then_the_methods():
    rc, text, err = run_help([])
    assert rc == 0 and err == ""
    head, _, methods = text.partition("methods (--method METHOD")
    shared = entries(head)
    for name in CONFIG:  # every shared setting, with the default method's value where it sets one
        inv, h = entry(shared, flag(name))
        if name in METHODS["grpo"].defaults:
            assert h.endswith(f"(default: {METHODS['grpo'].defaults[name]}, grpo's)"), (name, h)
    for name, m in METHODS.items():  # one line a method (its help wrapped)
        assert re.search(rf"^  {name} +{re.escape(m.help.split()[0])}", methods, re.M), name
    assert "rlbook train --method METHOD --help" in text
    assert "--clip-eps" not in text and "--beta" not in text  # no method's own options here


@pytest.mark.parametrize("name", list(METHODS))
def test_method_help_shows_the_method_defaults_and_only_its_options(name):
    m = METHODS[name]
    rc, text, err = run_help(["--method", name])
    assert rc == 0 and err == "" and text.startswith(f"usage: rlbook train --method {name}")
    assert "(default: None)" not in text
    shared, own = split(name)
    assert all(h.count("(default:") <= 1 for h in [*shared.values(), *own.values()])
    for f in CONFIG:  # M.defaults over TrainConfig's
        h = entry(shared, flag(f))[1]
        if f == "out":
            assert h.endswith(f"(default: runs/{name}-{m.defaults.get('task', 'addition')})")
        elif f in m.defaults:
            assert h.endswith(f"(default: {m.defaults[f]}, {name}'s)"), (f, h)
        elif getattr(TrainConfig, f) is not None:
            assert h.endswith(f"(default: {getattr(TrainConfig, f)})"), (f, h)
    fields = {f.name for f in dataclasses.fields(m.options)} if m.options is not None else set()
    allowed = {flag(f) for f in fields} | {flag(a.name) for a in ALIASES if a.field(m) is not None}
    allowed |= {"--no-" + f[2:] for f in allowed}
    listed = set().union(*map(flags_of, own)) if own else set()
    assert listed <= allowed, listed - allowed  # no other method's option
    for f in fields - set(CONFIG):  # each of its own, with its default and its meaning
        inv, h = entry(own, flag(f))
        default = getattr(m.options, f)
        assert h.endswith(f"(default: {default!r})" if default == "" else f"(default: {default})"), (f, h)
        assert h.startswith(cli.meaning(m, f)), (f, h)
    if m.options is None:
        assert text.rstrip().endswith(f"{name} has no options of its own.")


def test_first_word_names_the_method_as_method_does():
    for name in ("ipo", "ppo", "sft"):
        assert run_help([name]) == run_help(["--method", name])
        assert run_help([name, "--method", name]) == run_help(["--method", name])


def test_option_help_is_used_when_set_and_the_field_comment_otherwise(monkeypatch):
    ipo, ppo = METHODS["ipo"], METHODS["ppo"]
    assert entry(split("ipo")[1], "--beta")[1].startswith(ipo.option_help["beta"])  # the chapter's own line for IPO
    assert entry(split("dpo")[1], "--beta")[1].startswith(cli.field_help(type(ipo.options))["beta"])  # none for DPO
    monkeypatch.setitem(METHODS, "ipo", dataclasses.replace(ipo, option_help={
        "beta": "IPO: tau, the margin's scale 1/(2 tau)", "batch_size": "preference pairs per step"}))
    monkeypatch.setitem(METHODS, "ppo", dataclasses.replace(ppo, option_help={"clip_eps": "PPO's epsilon"}))
    shared, own = split("ipo")
    assert entry(own, "--beta")[1] == "IPO: tau, the margin's scale 1/(2 tau) (default: 0.1)"
    assert entry(shared, "--batch-size")[1] == "preference pairs per step (default: 32, ipo's)"
    assert entry(split("dpo")[1], "--beta")[1].startswith(cli.field_help(type(ipo.options))["beta"])  # dpo's own
    assert entry(split("ppo")[1], "--clip-eps")[1] == "PPO's epsilon (default: 0.2)"


def test_trl_names_stand_beside_the_book_flags():
    shared, own = split("grpo")
    assert flags_of(entry(shared, "--group-size")[0]) == {"--group-size", "--num-generations"}
    assert {"--lr", "--learning-rate"} <= flags_of(entry(shared, "--lr")[0])
    assert {"--steps", "--max-steps"} == flags_of(entry(shared, "--steps")[0])
    assert "optimizer updates" in entry(shared, "--steps")[1]
    assert {"--clip-eps-low", "--epsilon"} == flags_of(entry(own, "--clip-eps-low")[0])
    assert "--loss-type" in "".join(own) and "dr_grpo = constant" in entry(own, "--loss-type")[1]
    ppo = split("ppo")[1]
    assert {"--clip-eps", "--cliprange", "--epsilon", "--epsilon-high"} == flags_of(entry(ppo, "--clip-eps")[0])
    assert {"--beta", "--kl-coef"} == flags_of(entry(ppo, "--beta")[0])
    assert "--loss-type" not in "".join(ppo)
    assert {"--cispo-cap", "--epsilon-high"} == flags_of(entry(split("cispo")[1], "--cispo-cap")[0])
    assert "sigmoid is dpo's" in entry(split("dpo")[1], "--loss-type")[1]


def test_every_alias_is_a_flag_of_its_own_and_none_is_a_book_flag():
    names = [flag(a.name) for a in ALIASES]
    book = {flag(f) for f in CONFIG} | {flag(f.name) for m in METHODS.values() if m.options is not None
                                        for f in dataclasses.fields(m.options)}
    assert len(names) == len(set(names)) and not set(names) & book


def test_help_from_a_real_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    p = subprocess.run([sys.executable, "-m", "rlbook.cli", "train", "ppo", "--help"], capture_output=True, text=True,
                       env=env, timeout=180)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.startswith("usage: rlbook train --method ppo")
    assert max(map(len, p.stdout.splitlines())) <= 98  # the terminal's width, as argparse


def test_eval_help_shows_no_none_default(capsys):
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: 200)" in text
