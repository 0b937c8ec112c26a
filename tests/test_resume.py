"""Runs that survive: no pickle is ever loaded, no run is destroyed or silently changed, signals and kills at any
moment end in a checkpoint from which the run resumes bit for bit, and damage falls back to the previous one."""
import contextlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import rlbook.train as T
from rlbook.models import RLBookError
from rlbook.reward_model import load_reward_model
from rlbook.sft import SFT
from rlbook.train import Interrupted, Method, checkpoint_step, find_checkpoint, read_metrics, train

from conftest import CLI, ENV, strip, weights

BASE = dict(model="tiny", steps=4, batch_size=8, lr=1e-3, warmup_steps=0, eval_n=4, eval_every=2, save_every=1,
            progress=False, device="cpu")


def sft_config(out, **kw):
    return SFT.config(**{**BASE, "out": str(out), **kw})


def quiet(fn, *a, **kw):  # (fn's result, what it wrote to stderr)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        return fn(*a, **kw), err.getvalue()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "An uninterrupted 4-step SFT run with a checkpoint after every step (checkpoint = 4, checkpoint.old = 3)."
    out = tmp_path_factory.mktemp("reference") / "run"
    train(sft_config(out), SFT)
    assert checkpoint_step(out / "checkpoint") == 4 and checkpoint_step(out / "checkpoint.old") == 3
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_same_run(a, b):  # identical metrics (but wall-clock times) and bit-identical weights
    assert strip(read_metrics(a / "metrics.jsonl")) == strip(read_metrics(b / "metrics.jsonl"))
    assert torch.equal(weights(a / "checkpoint" / "model"), weights(b / "checkpoint" / "model"))


# --- no pickle is loaded ---------------------------------------------------------------------------------

class Evil:
    "Unpickling this runs a shell command that creates a marker file."
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"optimizer": Evil(marker)}, f)


def legacy(ckpt, marker):  # the layout of older rlbook versions: progress.json without files, state.pt
    for name in ("state.json", "state.safetensors"):
        (ckpt / name).unlink()
    (ckpt / "progress.json").write_text(json.dumps({"step": 4, "config": {}}))
    plant(ckpt / "state.pt", marker)


PLACES = {
    "legacy-state.pt": legacy,
    "state.pt-beside-a-good-checkpoint": lambda ckpt, marker: plant(ckpt / "state.pt", marker),
    "pytorch_model.bin": lambda ckpt, marker: plant(ckpt / "model" / "pytorch_model.bin", marker),
    "in-checkpoint.old": lambda ckpt, marker: plant(ckpt.with_name("checkpoint.old") / "optimizer.pt", marker),
}


@pytest.mark.parametrize("place", list(PLACES))
def test_a_malicious_pickle_is_refused_and_never_runs(place, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    marker = tmp_path / "pwned"
    PLACES[place](out / "checkpoint", marker)
    with pytest.raises(RLBookError, match="a pickle, which can run code") as e:
        quiet(train, sft_config(out, resume=True), SFT)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    evil = next(p for p in out.rglob("*") if p.suffix in (".pt", ".bin"))
    with open(evil, "rb") as f:  # the power check: loading it the old way would have run the command
        pickle.load(f)
    assert marker.exists()


def test_a_malicious_reward_model_is_refused(reference, tmp_path):
    out = copy_run(reference, tmp_path / "rm")
    marker = tmp_path / "pwned"
    legacy(out / "checkpoint", marker)
    with pytest.raises(RLBookError, match="a pickle"):
        load_reward_model(str(out))
    from rlbook.cli import main
    rc, err = quiet(main, ["train", "--method", "ppo", "--reward-model", str(out), "--steps", "1", "--device", "cpu",
                           "--out", str(tmp_path / "ppo"), "--no-progress"])
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[rlbook]")]
    assert rc == 2 and len(lines) == 1 and "a pickle" in lines[0], err
    assert not marker.exists()


def test_a_reward_model_run_loads_without_pickles(tmp_path):
    from rlbook.reward_model import REWARD_MODEL
    cfg = REWARD_MODEL.config(model="tiny", steps=1, batch_size=8, eval_every=0, eval_n=4, out=str(tmp_path / "rm"),
                              progress=False, device="cpu")
    o = dataclasses_replace(REWARD_MODEL.options, eval_pairs=8)
    run = train(cfg, REWARD_MODEL, options=o)
    rm, _ = load_reward_model(str(tmp_path / "rm"), device="cpu")
    trained = run.modules["rm"].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in rm.state_dict().items())
    assert not list((tmp_path / "rm").rglob("*.pt"))


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


# --- resuming means the same run --------------------------------------------------------------------------

def test_a_changed_configuration_is_refused_with_its_flags(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RLBookError, match="differs from the checkpoint") as e:
        train(sft_config(out, resume=True, lr=3e-3, batch_size=16, seed=1), SFT)
    msg = str(e.value)
    assert "--batch-size: 8 -> 16" in msg and "--lr: 0.001 -> 0.003" in msg and "--seed: 0 -> 1" in msg
    assert "--steps" not in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.json not rewritten
    # another method on the same folder (same TrainConfig, even the same functions): a different run
    with pytest.raises(RLBookError, match="--method"):
        train(sft_config(out, resume=True), Method("sft_copy", SFT.collect, SFT.loss))
    # the explicit override continues, with a warning, and records the new configuration
    _, err = quiet(train, sft_config(out, resume=True, steps=5, lr=3e-3, allow_config_change=True), SFT)
    assert "--allow-config-change: resuming with --lr: 0.001 -> 0.003" in err
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-3 and checkpoint_step(out / "checkpoint") == 5


def test_steps_may_grow_but_not_shrink(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    with pytest.raises(RLBookError, match="--steps 3 is below the 4 steps"):
        train(sft_config(out, resume=True, steps=3), SFT)
    assert len(read_metrics(out / "metrics.jsonl")) == 5
    longer = tmp_path / "longer"
    train(sft_config(longer, steps=5), SFT)
    train(sft_config(out, resume=True, steps=5), SFT)
    assert_same_run(longer, out)


def test_resume_on_a_new_folder_starts_and_says_so(tmp_path):
    _, err = quiet(train, sft_config(tmp_path / "new", resume=True, steps=1), SFT)
    assert "no checkpoint in" in err and "starting at step 0" in err
    assert [r["step"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl")] == [0, 1]


def test_overwrite_replaces_only_the_run(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    _, err = quiet(train, sft_config(out, steps=1, overwrite=True), SFT)
    assert "--overwrite: replacing the run" in err
    assert (out / "notes.txt").read_text() == "mine" and not (out / "checkpoint.old").exists()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


# --- one run per folder; leftovers of dead processes ------------------------------------------------------

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_lock_refuses_and_a_dead_one_is_taken_over(reference, tmp_path):
    import socket
    out = copy_run(reference, tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()}")
        with pytest.raises(RLBookError, match=f"in use by process {sleeper.pid}"):
            train(sft_config(out, resume=True), SFT)
    finally:
        sleeper.kill()
        sleeper.wait()
    _, err = quiet(train, sft_config(out, resume=True), SFT)
    assert f"taking over {out / '.lock'} from process {sleeper.pid}" in err
    assert not (out / ".lock").exists()  # released at the end
    assert_same_run(reference, out)


def test_stale_temporary_folders_are_removed(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    pid = dead_pid()
    (out / f"checkpoint.tmp{pid}" / "model").mkdir(parents=True)
    (out / f"metrics.jsonl.tmp{pid}").write_text("{}")
    (out / f"pairs.jsonl.tmp{pid}").write_text('{"prompt": "1+1=", "cho')  # a DPO setup killed mid-write
    _, err = quiet(train, sft_config(out, resume=True), SFT)
    assert f"checkpoint.tmp{pid}, left unfinished by process {pid}" in err
    assert not list(out.glob("*.tmp*"))


# --- signals: a checkpoint at the step boundary -----------------------------------------------------------

def signalling(signum, at_step, times=1):
    def collect(run):
        if run.step == at_step and not run.cfg.resume:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return SFT.collect(run)
    return collect


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_checkpoints_the_step_and_resumes_exactly(signum, reference, tmp_path):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # (a test worker may ignore SIGINT)
    with pytest.raises(Interrupted):  # save_every=0: the signal alone makes the checkpoint
        quiet(train, sft_config(out, save_every=0), Method("sft", signalling(signum, 1), SFT.loss))
    assert checkpoint_step(find_checkpoint(out)) == 2 and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    train(sft_config(out, save_every=0, resume=True), Method("sft", signalling(signum, 1), SFT.loss))
    assert_same_run(reference, out)


def test_a_second_signal_during_the_save_does_not_abandon_it(monkeypatch, tmp_path):
    original = T.write_state

    def write_state(state, folder):  # Ctrl-C again while the checkpoint is being written
        os.kill(os.getpid(), signal.SIGINT)
        return original(state, folder)
    monkeypatch.setattr(T, "write_state", write_state)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        _, err = quiet(train, sft_config(out, save_every=0), Method("sft", signalling(signal.SIGINT, 1), SFT.loss))
    assert T.checkpoint_problem(out / "checkpoint") is None and checkpoint_step(out / "checkpoint") == 2


def test_a_second_signal_between_saves_stops_at_once(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as e:
        quiet(train, sft_config(out), Method("sft", signalling(signal.SIGINT, 2, times=2), SFT.loss))
    assert type(e.value) is KeyboardInterrupt  # not Interrupted: no new checkpoint
    assert checkpoint_step(find_checkpoint(out)) == 2  # the last periodic one is intact


# --- damage -------------------------------------------------------------------------------------------------

def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "empty-state-safetensors": lambda c: (c / "state.safetensors").write_bytes(b""),
    "truncated-model-safetensors": lambda c: truncate(c / "model" / "model.safetensors"),
    "truncated-state-json": lambda c: truncate(c / "state.json"),
    "bad-progress-json": lambda c: (c / "progress.json").write_text('{"step": 4, "fil'),
    "missing-state-json": lambda c: (c / "state.json").unlink(),
    "flipped-byte-in-weights": lambda c: flip(c / "model" / "model.safetensors"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_passed_over_for_the_previous_one(kind, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    DAMAGE[kind](out / "checkpoint")
    found, err = quiet(find_checkpoint, out)
    assert found == out / "checkpoint.old"
    assert f"{out / 'checkpoint'} is damaged" in err and "falling back to" in err and "(step 3)" in err


def test_resuming_from_the_fallback_is_exact(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    DAMAGE["empty-state-safetensors"](out / "checkpoint")
    _, err = quiet(train, sft_config(out, resume=True), SFT)
    assert f"falling back to {out / 'checkpoint.old'} (step 3)" in err
    assert (out / "checkpoint.damaged").exists()  # kept for inspection, not reused as the next fallback
    assert_same_run(reference, out)
    assert checkpoint_step(out / "checkpoint.old") == 3 and T.checkpoint_problem(out / "checkpoint.old") is None


def test_two_damaged_checkpoints_are_one_clear_error(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    DAMAGE["empty-state-safetensors"](out / "checkpoint")
    DAMAGE["bad-progress-json"](out / "checkpoint.old")
    rows = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(RLBookError, match="no usable checkpoint"):
        quiet(train, sft_config(out, resume=True), SFT)
    assert (out / "metrics.jsonl").read_bytes() == rows


def test_a_truncated_last_metrics_line_is_dropped(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # a kill in the middle of an append
    rows, err = quiet(read_metrics, out / "metrics.jsonl")
    assert len(rows) == 5 and "dropped its last line" in err
    quiet(train, sft_config(out, resume=True), SFT)
    assert_same_run(reference, out)
    (out / "metrics.jsonl").write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(RLBookError, match="line 2, is not JSON"):  # damage in the middle is not a kill
        read_metrics(out / "metrics.jsonl")


# --- real processes: signals and random SIGKILLs (slow) ---------------------------------------------------

def launch(args, out, *extra):
    return subprocess.Popen(CLI + args + ["--out", str(out), *extra], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


SFT_ARGS = ["train", "--method", "sft", "--model", "tiny", "--steps", "30", "--batch-size", "16", "--eval-every", "10",
            "--eval-n", "10", "--no-progress", "--device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_command_line_exits_130_with_a_checkpoint(signum, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(CLI + SFT_ARGS + ["--out", str(full)], check=True, env=ENV, capture_output=True)
    p = launch(SFT_ARGS, cut)
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(cut / "metrics.jsonl", warn=False)) < 3:
        time.sleep(0.05)
    p.send_signal(signum)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "stopped after step" in err and "Traceback" not in err
    n = len(read_metrics(cut / "metrics.jsonl"))
    assert 3 <= n < 30 and checkpoint_step(find_checkpoint(cut)) == n
    subprocess.run(CLI + SFT_ARGS + ["--out", str(cut), "--resume"], check=True, env=ENV, capture_output=True)
    assert_same_run(full, cut)


KILL_METHODS = {  # method: flags (small runs of the tiny warm start, a checkpoint after every step)
    "grpo": ["--method", "grpo", "--batch-size", "16", "--group-size", "4"],
    "ppo": ["--method", "ppo", "--batch-size", "16", "--minibatch-size", "8"],
    "dpo": ["--method", "dpo", "--batch-size", "16", "--n-pairs", "48"],
    "online_dpo": ["--method", "online_dpo", "--batch-size", "16", "--ref-sync-every", "3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(KILL_METHODS))
def test_sigkill_at_random_moments_resumes_exactly(method, tmp_path):
    "Three SIGKILLs at random moments, each followed by --resume, end in the uninterrupted run, bit for bit."
    args = ["train", *KILL_METHODS[method], "--model", "tiny-sft", "--steps", "8", "--eval-every", "4",
            "--eval-n", "10", "--save-every", "1", "--no-progress", "--device", "cpu"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    t0 = time.time()
    subprocess.run(CLI + args + ["--out", str(full)], check=True, env=ENV, capture_output=True)
    wall = time.time() - t0
    rng = random.Random(method)
    kills, launches, mode = 0, 0, "--resume"
    while kills < 3 and launches < 10:
        launches += 1
        p = launch(args, killed, mode)
        time.sleep(rng.uniform(0.2, 1.0) * wall)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        _, err = p.communicate()
        mode = "--resume"
        if p.returncode == 2 and "no usable checkpoint" in err:  # killed after a metrics row, before a checkpoint
            mode = "--overwrite"  # what the refusal asks for
        elif p.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(err[-3000:])
    assert kills == 3, f"only {kills} kills landed in {launches} launches"
    final = subprocess.run(CLI + args + ["--out", str(killed), mode], env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_run(full, killed)
    if method == "online_dpo":  # the reference really was refreshed, and resumed with its refreshed weights
        assert sum(r.get("ref/synced", 0) for r in read_metrics(killed / "metrics.jsonl")) == 2
