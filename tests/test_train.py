"""Process-level tests of the training loop: SIGKILL and resume; two processes (gloo) vs one."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlbook.train import checkpoint_step, find_checkpoint, read_metrics, train

from conftest import CLI, ENV, strip, weights

BIN = Path(sys.executable).parent


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    args = ["train", "--method", "sft", "--steps", "40", "--batch-size", "16", "--save-every", "2",
            "--eval-every", "10", "--eval-n", "20", "--no-progress"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(CLI + args + ["--out", str(full)], check=True, env=ENV, capture_output=True)

    p = subprocess.Popen(CLI + args + ["--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        ck = find_checkpoint(killed, verify=False, quiet=True)
        try:
            if ck is not None and checkpoint_step(ck) >= 6:
                break
        except OSError:  # renamed by the save between the two calls
            pass
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = find_checkpoint(killed)
    step = json.loads((ck / "progress.json").read_text())["step"]
    assert 6 <= step < 40  # killed mid-run, with a complete checkpoint

    subprocess.run(CLI + args + ["--out", str(killed), "--resume"], check=True, env=ENV, capture_output=True)
    a, b = strip(read_metrics(full / "metrics.jsonl")), strip(read_metrics(killed / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(41))
    assert a == b  # every logged number identical, evaluations included
    assert torch.equal(weights(full / "checkpoint" / "model"), weights(killed / "checkpoint" / "model"))


SPLITS = ("fsdp", "zero2", "zero3")  # configs/*.yaml that shard the training state (tests/dist_update.py runs them on CPUs)
DIST_METHODS = ("sft", "grpo", "lite_ppo", "reinforce_pp", "ppo", "dpo")  # batch-level statistics: lite_ppo's std, the whitening of reinforce_pp and ppo


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    "One update of each method, once in one process and once in two (torchrun, gloo): tests/dist_update.py."
    root = tmp_path_factory.mktemp("dist")
    script = Path(__file__).with_name("dist_update.py")
    one = subprocess.run([sys.executable, str(script), str(root / "one"), *DIST_METHODS], env=ENV, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517",
                          str(script), str(root / "two"), *DIST_METHODS], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    outs = two.stdout
    for split in SPLITS:  # the weights split by configs/SPLIT.yaml (DeepSpeed wraps one model: no PPO, whose critic is a second)
        methods = [m for m in DIST_METHODS if split == "fsdp" or m != "ppo"]
        p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29518", str(script),
                            str(root / split), *methods], env={**ENV, "RLBOOK_TEST_SPLIT": split}, capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        outs += p.stdout
    return root, one.stdout, outs


@pytest.mark.parametrize("split", ["two", *SPLITS])
@pytest.mark.parametrize("method", DIST_METHODS)
def test_two_processes_equal_one_process_on_the_combined_batch(one_and_two_processes, method, split):
    """Same completions, same update: scores, advantages, batch whitening, normalisers and gradient averaging over 2
    processes, with whole weights on each (DDP) or split by configs/fsdp.yaml, zero2.yaml (optimizer state and
    gradients) or zero3.yaml (weights too); grpo and dpo take two micro-batches an update."""
    if method == "ppo" and split.startswith("zero"):
        pytest.skip("DeepSpeed wraps one model: PPO's critic is refused (test_scale checks the refusal)")
    root, out1, out2 = one_and_two_processes
    held = {"two": "whole", "fsdp": "sharded", "zero2": "whole", "zero3": "sharded"}[split]
    assert f"{method} world 1  whole\n" in out1
    assert f"{method} world 2 {'' if split == 'two' else split} {held}\n" in out2
    w1, w2 = torch.load(root / "one" / f"{method}.pt"), torch.load(root / split / f"{method}.pt")
    assert w1.keys() == w2.keys()
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-6, diff
    r1, r2 = (json.loads((root / d / f"{method}.json").read_text()) for d in ("one", split))
    assert r1["moved"] > 1e-3, "the update was (nearly) zero: the comparison would prove nothing"
    for k in ("loss", "reward/mean", "grad_norm"):  # the whole step's figures, not the main process's share
        if k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), k


def dist_script(out, mode: str, port: int, timeout: int = 300, **env):  # tests/dist_update.py OUT MODE in 2 processes
    script = Path(__file__).with_name("dist_update.py")
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), str(script), str(out),
                        mode], env={**ENV, **env}, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]


def test_generation_in_lockstep_with_sharded_weights(tmp_path):
    "fully_shard's weights: a process whose rows have ended keeps joining forward passes; its samples are the whole model's."
    dist_script(tmp_path, "lockstep", 29522)
    for r in range(2):
        got = json.loads((tmp_path / f"lockstep{r}.json").read_text())
        assert got["sharded"] and not got["plain"]
        assert got["lengths"][0] != got["lengths"][1], "both processes decoded equally long: nothing was in lockstep"
        assert got["same_tokens"] and got["same_mask"] and got["logp_gap"] < 1e-5


@pytest.mark.parametrize("split", ["ddp", "fsdp"])
def test_two_processes_resume_exactly(tmp_path, split):
    "Two GRPO steps (AdamW) in one go, or one step, a checkpoint, and a resumed second: the same weights, DDP or FSDP."
    dist_script(tmp_path, "resume", 29523, timeout=600, RLBOOK_TEST_SPLIT="fsdp" if split == "fsdp" else "")
    got = json.loads((tmp_path / "resume.json").read_text())
    assert got["world"] == 2 and got["sharded"] == (split == "fsdp")
    assert got["second_step"] > 1e-4, "the second step changed nothing: the comparison would prove nothing"
    assert got["resume"] < 1e-6  # optimizer state, weights and random streams restored on every process
    assert got["checkpoint"] < 1e-6  # the checkpoint's model, read by plain from_pretrained, is the whole policy


def test_statistics_of_the_whole_batch():
    "masked_whiten and batch_std with a reduce equal the one-process figures on the concatenated batch."
    from rlbook.grpo import batch_std
    from rlbook.logprobs import masked_whiten
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.3).long()
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]  # unequal shares, as after a filter
    # two processes emulated: each half is whitened with a reduce that answers what an all-reduce sum would,
    # its own partial sums plus the other half's (the count and sum first, then the squared deviations)
    n = [m.float().sum() for _, m in halves]
    s = [(xx * m).sum() for xx, m in halves]
    mean = (s[0] + s[1]) / (n[0] + n[1])
    sq = [(((xx - mean) * m) ** 2).sum() for xx, m in halves]
    whole = masked_whiten(x, mask)
    for i, (xx, m) in enumerate(halves):
        answers = iter([torch.stack([n[0] + n[1], s[0] + s[1]]), sq[0] + sq[1]])
        got = masked_whiten(xx, m, reduce=lambda t: next(answers))
        assert torch.allclose(got, whole[:3] if i == 0 else whole[3:], atol=1e-6)
        assert not torch.allclose(masked_whiten(xx, m), got, atol=1e-3)  # the half's own statistics differ
    r = torch.randn(12, generator=g)
    parts = [r[:4], r[4:]]
    for i, part in enumerate(parts):
        sums = iter([torch.stack([torch.tensor(12.0), r.sum()]), ((r - r.mean()) ** 2).sum()])
        assert torch.allclose(batch_std(part, 4, reduce=lambda t: next(sums)), r.std(correction=0).expand(len(part)))
        assert not torch.allclose(batch_std(part, 4), r.std(correction=0).expand(len(part)), atol=1e-3)


def test_a_plot_after_training_in_one_kernel_is_shown(tmp_path):
    "train() saves metrics.png without switching matplotlib's backend: a later cell's plots still display."
    import nbformat
    from nbclient import NotebookClient
    out = tmp_path / "run"
    cells = [f"from rlbook.sft import SFT\nfrom rlbook.train import train, read_metrics, plot_metrics\n"
             f"train(SFT.config(model='tiny', steps=1, batch_size=8, eval_n=4, out={str(out)!r}, progress=False,"
             f" device='cpu'), SFT);",
             "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()",
             f"plot_metrics(read_metrics({str(out / 'metrics.jsonl')!r}))"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (out / "metrics.png").exists()
    for cell in nb.cells[1:]:
        kinds = [o.get("output_type") for o in cell.outputs]
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), (cell.source, kinds, cell.outputs)
    assert sum("image/png" in o.get("data", {}) for o in nb.cells[2].outputs) == 1  # shown once, not twice



def test_fused_adamw_is_the_same_update_up_to_rounding(tmp_path):
    "--optim adamw_torch_fused (TRL's default optimizer) trains the same model as PyTorch's per-tensor AdamW."
    from rlbook.models import load_policy
    from rlbook.sft import SFT
    from rlbook.train import train
    runs = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        cfg = SFT.config(steps=5, batch_size=16, eval_every=0, eval_n=10, lr=1e-3, weight_decay=0.01,
                         optim=optim, out=str(tmp_path / optim), progress=False)
        runs[optim] = dict(train(cfg, SFT).policy.named_parameters())
    init = dict(load_policy("tiny", seed=0)[0].named_parameters())
    a, b = runs["adamw_torch"], runs["adamw_torch_fused"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-4 and worst < moved / 100, (moved, worst)  # five real updates, equal up to float rounding


def test_shipped_warm_starts_keep_their_names():
    "A new TrainConfig setting must not rename the shipped warm starts (a rename rebuilds them: minutes of SFT)."
    from rlbook.sft import SLOPPY_WARM_START, WARM_START, shipped_root, warm_start_name
    from rlbook.train import TrainConfig
    for recipe in (WARM_START, SLOPPY_WARM_START):
        assert (shipped_root() / warm_start_name(TrainConfig(**recipe)) / "model" / "config.json").exists(), recipe


def test_statistics_over_processes_with_different_names(tmp_path):
    "over_processes: means averaged, parts and totals summed, a statistic one process lacks (or has as NaN) left out there."
    dist_script(tmp_path, "stats", 29521, timeout=120)
    got = json.loads((tmp_path / "stats.json").read_text())
    assert got["means"]["reward/mean"] == pytest.approx(0.7)  # (0.2 + 1.2) / 2
    assert got["means"]["turns/total"] == pytest.approx(7)  # 3 + 4: a total
    assert got["means"]["len/wrong"] == pytest.approx(4.0)  # only process 1 has it
    assert got["means"]["entropy"] == pytest.approx(0.5)  # process 0's NaN left out
    assert got["parts"]["loss"] == pytest.approx(4.0)  # 1.5 + 2.5


@pytest.mark.parametrize("split", ["zero2", "zero3"])
def test_deepspeed_checkpoints_hold_the_whole_model_and_refuse_resume(tmp_path, split):
    "ZeRO's optimizer state stays in per-process shards: the checkpoint holds the whole model, and --resume says why not."
    dist_script(tmp_path, "resume", 29524, timeout=600, RLBOOK_TEST_SPLIT=split)
    got = json.loads((tmp_path / "resume.json").read_text())
    assert got["world"] == 2 and got["sharded"] == (split == "zero3")
    assert got["checkpoint"] < 1e-6  # ZeRO-3: gathered from both processes
    assert got["refused"].startswith("--resume with DeepSpeed is not supported")


@pytest.mark.parametrize("split", SPLITS)
def test_the_command_line_under_a_split(tmp_path, split):
    "`rlbook train` with the training state split by configs/SPLIT.yaml: one summary, the metric rows, a whole-model checkpoint."
    out = tmp_path / "run"
    script = Path(__file__).with_name("dist_update.py")
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29525", str(script), str(out),
                        "cli", "grpo", "--batch-size", "16", "--group-size", "4", "--steps", "2", "--eval-n", "8"],
                       env={**ENV, "RLBOOK_TEST_SPLIT": split}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("held-out accuracy") == 1 and "over 2 processes" in p.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert (out / "checkpoint" / "model" / "model.safetensors").exists()


def test_runs_of_different_precisions_in_one_process(tmp_path):
    "accelerate keeps a process's first precision and refuses another; train starts each single-process run afresh."
    from rlbook.grpo import GRPO
    for i, mp in enumerate(("no", "bf16", "no")):
        cfg = GRPO.config(model="tiny", steps=1, batch_size=8, group_size=4, max_new_tokens=4, eval_every=0, eval_n=4,
                          mixed_precision=mp, out=str(tmp_path / f"{i}"), progress=False, device="cpu")
        assert train(cfg, GRPO).accelerator.mixed_precision == mp
