"""Process-level tests of the training loop: SIGKILL and resume; two processes (gloo) vs one."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlbook.train import checkpoint_step, find_checkpoint, read_metrics

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


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    script = Path(__file__).with_name("dist_update.py")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517",
                          str(script), str(tmp_path / "two")], env=ENV, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2" in two.stdout and "world 1" in one.stdout
    w1, w2 = torch.load(tmp_path / "one" / "weights.pt"), torch.load(tmp_path / "two" / "weights.pt")
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-6, diff
    # and the update was not trivially zero: compare with a fresh initialisation
    from rlbook.models import load_policy
    m0, _ = load_policy("tiny", seed=0)
    moved = max(float((w1[k] - v).abs().max()) for k, v in m0.state_dict().items() if k in w1)
    assert moved > 1e-3


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
