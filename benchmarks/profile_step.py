"""Where one rlbook GRPO step's time goes: a profile table of the benchmark's step (no TRL needed).

The step of benchmarks/grpo_vs_trl.py (8 prompts x 4 completions x up to 32 new tokens, fp32, beta = 0, one
optimizer step per batch, fused AdamW, 2 threads), trained for a few steps with a clock around each phase:
sampling (`generate`), the training forward pass (`completion_logprobs`), the backward pass, the gradient norm and
the optimizer step; "the rest" is the step's wall time minus these (rewards, advantages, logging). Sampling is then
profiled once more by operator (torch.profiler) and split into matrix products, attention, the sampler's Exp(1)
noise and everything else, each scaled to the measured sampling time. Steps 2 onwards count (the first includes
start-up). Prints a table per model and appends it to benchmarks/results/profile.csv.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_step.py                  # tiny GPT-2 and SmolLM2-135M
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/profile_step.py --models tiny   # the tiny model only
"""
import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_csv, build_model, run_child, stamp  # noqa: E402
from grpo_vs_trl import GROUP, NEW_TOKENS, PROMPTS, THREADS, prompts, train_rlbook  # noqa: E402  (the same step)

PHASES = ("sampling: matrix products", "sampling: attention", "sampling: Exp(1) noise", "sampling: the rest",
          "training forward", "backward", "gradient norm", "optimizer step", "the rest")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def clocked(fn, name: str, spent: dict):
    "fn, adding its wall time to spent[name]."
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - t
    return wrapper


def sampling_split(model, tok, prompts: list) -> dict:
    "Shares of one sampling pass's operator time: matrix products, attention, the Exp(1) noise, the rest."
    import torch
    from rlbook.rollout import generate
    with torch.profiler.profile() as prof:
        generate(model, tok, prompts, group_size=GROUP, max_new_tokens=NEW_TOKENS,
                 generator=torch.Generator().manual_seed(1))
    parts = defaultdict(float)
    for ev in prof.key_averages():
        k = ("matrix products" if ev.key in MATMUL_OPS else "attention" if "attention" in ev.key
             else "Exp(1) noise" if ev.key == "aten::exponential_" else "the rest")
        parts[k] += ev.self_cpu_time_total
    total = sum(parts.values())
    return {k: v / total for k, v in parts.items()}


def run_profile(name: str, steps: int) -> dict:
    "Train `steps` GRPO steps with a clock around each phase; the phases' seconds over steps 2..N and the step time."
    import torch
    import rlbook.reinforce as reinforce
    import rlbook.rollout as rollout
    import rlbook.train as train_mod
    spent, first = defaultdict(float), {}
    rollout.generate = clocked(rollout.generate, "sampling", spent)  # (play() looks it up here)
    reinforce.completion_logprobs = clocked(reinforce.completion_logprobs, "training forward", spent)
    train_mod.backward = clocked(train_mod.backward, "backward", spent)
    train_mod.clip_gradients = clocked(train_mod.clip_gradients, "gradient norm", spent)
    adamw_step = clocked(torch.optim.AdamW.step, "optimizer step", spent)

    def step_then_mark(self, *args, **kwargs):  # the clocks as the first step ends: steps 2..N are what counts
        out = adamw_step(self, *args, **kwargs)
        if not first:
            first.update(spent)
        return out

    torch.optim.AdamW.step = step_then_mark
    model, tok = build_model(name)
    out = tempfile.mkdtemp()
    train_rlbook(name, steps, out, model, tok)
    rows = [r for r in train_mod.read_metrics(f"{out}/metrics.jsonl") if "reward/mean" in r]
    shutil.rmtree(out, ignore_errors=True)  # the run's checkpoint: 1.6 GB for SmolLM2
    n = len(rows) - 1  # steps 2..N
    return {"step_s": (rows[-1]["time"] - rows[0]["time"]) / n,
            "phases": {k: (v - first.get(k, 0.0)) / n for k, v in spent.items()},
            "split": sampling_split(model, tok, [e.prompt for e in prompts(PROMPTS)])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], help="'tiny' and/or 'smollm2-135m'")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: 12 tiny, 4 SmolLM2)")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch / OpenMP threads")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        import torch
        _, name, steps, n = a.child
        torch.set_num_threads(int(n))
        print("RESULT " + json.dumps(run_profile(name, int(steps))), flush=True)
        return 0
    for name in a.models:
        steps = a.steps or (12 if name == "tiny" else 4)
        r = run_child(__file__, ("profile", name, steps, a.threads), a.threads)
        print_table(name, steps, r, a.threads)
    return 0


def print_table(name: str, steps: int, r: dict, threads: int) -> None:
    "The phases in ms per step and as shares of the step; one CSV row."
    step, per, split = r["step_s"], r["phases"], r["split"]
    rows = {f"sampling: {k}": per.get("sampling", 0.0) * split.get(k, 0.0)
            for k in ("matrix products", "attention", "Exp(1) noise", "the rest")}
    rows.update({k: per.get(k, 0.0) for k in ("training forward", "backward", "gradient norm", "optimizer step")})
    rows["the rest"] = max(step - sum(rows.values()), 0.0)
    print(f"\n{name}: one GRPO step, {PROMPTS} prompts x {GROUP} completions x {NEW_TOKENS} new tokens, fp32, "
          f"{threads} threads: {step:.3f} s/step (mean of steps 2..{steps})")
    print(f"  {'phase':28s} {'ms/step':>9s} {'share':>7s}")
    for k in PHASES:
        print(f"  {k:28s} {1e3 * rows[k]:9.1f} {100 * rows[k] / step:6.1f}%")
    append_csv("profile", [{**stamp(), "model": name, "threads": threads, "steps": steps, "step_s": round(step, 4),
                            **{k: round(rows[k], 4) for k in PHASES}}])


if __name__ == "__main__":
    sys.exit(main())
