"""The benchmarks' shared arithmetic (benchmarks/common.py) and their behaviour without the optional TRL."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def test_matmul_params_counts_a_tied_head_once():
    "GPT-2 ties the output head to the token embedding: one (V, d) matrix, plus wpe and 4 d^2 + 8 d^2 per layer."
    from transformers import GPT2Config, GPT2LMHeadModel
    V, d, L, n_pos = 50, 16, 2, 32
    m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=d, n_layer=L, n_head=2, n_positions=n_pos))
    assert m.lm_head.weight is m.transformer.wte.weight
    assert common.matmul_params(m) == V * d + n_pos * d + L * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)


def test_step_times_drop_the_first_step():
    assert common.step_times([0.0, 5.0, 6.0, 8.0]) == [1.0, 2.0]


def test_roofline_measures_positive_rates_on_the_tiny_model():
    model, tok = common.build_model("tiny")
    r = common.roofline(model, tok, ["12+34=", "5+6="], 2, 4, threads=1, matmul_n=128, bandwidth_mb=8)
    assert r["rows"] == 4 and 1 <= r["decode_steps"] <= 4
    for k in ("fb_gflops", "peak_fp32_gflops", "decode_tok_s", "decode_bound_tok_s", "decode_compute_bound_tok_s",
              "bandwidth_gbs"):
        assert r[k] > 0, k
    assert all(p.grad is None for p in model.parameters())  # the timing leaves no gradient behind


def test_append_csv_writes_one_header(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.append_csv("x", [{"a": 1, "b": 2}])
    common.append_csv("x", [{"a": 3, "b": 4}])
    assert (tmp_path / "x.csv").read_text().splitlines() == ["a,b", "1,2", "3,4"]


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed: the scripts would run")
@pytest.mark.parametrize("script", ["grpo_vs_trl.py", "dpo_vs_trl.py"])
def test_without_trl_the_benchmarks_say_so_and_exit_0(script):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--models", "tiny"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "TRL is not installed" in p.stdout


def test_precision_reaches_the_children_through_the_environment(monkeypatch):
    monkeypatch.setenv(common.PRECISION_ENV, "fp32")  # recorded, so the variable start() sets is undone after the test
    monkeypatch.delenv(common.PRECISION_ENV)
    assert common.precision() == "fp32"
    monkeypatch.setattr(sys, "argv", ["grpo_vs_trl.py", "--precision", "bf16", "--models", "tiny"])
    monkeypatch.setattr(common, "trl_version", lambda: "x")
    a, _ = common.start("doc", "12", 2, {})
    assert a.precision == "bf16" and common.precision() == "bf16"  # run_child copies os.environ
    monkeypatch.setattr(sys, "argv", ["grpo_vs_trl.py", "--precision", "fp16"])
    with pytest.raises(SystemExit):
        common.arguments("doc", "12")


def test_profile_step_splits_a_tiny_step_into_phases(tmp_path, monkeypatch):
    "The child measures every phase of steps 2..N; the phases fit inside the step; the table adds up to the step."
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--child", "profile", "tiny", "3",
                        "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = __import__("json").loads(next(line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")))
    for k in ("sampling", "training forward", "backward", "gradient norm", "optimizer step"):
        assert r["phases"][k] > 0, k
    assert sum(r["phases"].values()) <= r["step_s"] * 1.05  # clocks inside the step, none nested in another
    assert abs(sum(r["split"].values()) - 1) < 1e-9 and r["split"]["matrix products"] > 0
    import profile_step
    monkeypatch.setattr(profile_step, "append_csv", lambda name, rows: rows_seen.extend(rows))
    rows_seen = []
    profile_step.print_table("tiny", 3, r, 1)
    row = rows_seen[0]
    assert abs(sum(row[k] for k in profile_step.PHASES) - row["step_s"]) < 1e-3  # "the rest" closes the sum
