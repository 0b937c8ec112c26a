"""rlbook's GRPO against TRL's GRPOTrainer at equal work, on the CPU.

Same model, same prompts (addition), 8 prompts x 4 completions x up to 32 new tokens per step, one optimizer
step per batch, fp32 (or --precision bf16: bf16 autocast over fp32 weights on both sides, figures written to
*_bf16.csv, no roofline), beta = 0 (no reference model), sequence-mean ("grpo") loss, no gradient checkpointing,
AdamW as one fused kernel on both sides (TRL's default optimizer; rlbook's --optim adamw_torch_fused), 2
threads. Each side runs in its own process (its peak RSS is its own), and the sides alternate (A B A B) so that
drift on a shared machine hits both. Prints s/step (median of the repetitions' medians, with their range), peak
RSS and the ratios, then a roofline line for rlbook's step; appends every repetition to
benchmarks/results/grpo_vs_trl.csv with the load average (the roofline to roofline.csv).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grpo_vs_trl.py                 # tiny GPT-2 and SmolLM2-135M
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/grpo_vs_trl.py --models tiny  # the tiny model only

TRL is an optional extra (`pip install trl`); without it the script says so and exits 0.
"""
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (OPTIM, append_csv, build_model, compare, peak_rss_mb, precision, print_roofline,  # noqa: E402
                    roofline, run_child, start, stamp, step_times)

PROMPTS, GROUP, NEW_TOKENS, THREADS = 8, 4, 32, 2


def prompts(n: int) -> list:
    from rlbook.tasks import get_task
    return get_task("addition").sample(n, seed=0, split="train")


def train_rlbook(name: str, steps: int, out: str, model, tok) -> None:
    "rlbook's side of the comparison: `steps` GRPO steps of the benchmark's batch, metrics in `out`."
    from rlbook.grpo import GRPO, GRPOConfig
    from rlbook.train import train
    cfg = GRPO.config(model=name, steps=steps, batch_size=PROMPTS * GROUP, group_size=GROUP, lr=1e-6,
                      max_new_tokens=NEW_TOKENS, temperature=1.0, out=out, progress=False, device="cpu", optim=OPTIM,
                      mixed_precision="bf16" if precision() == "bf16" else "no")
    train(cfg, GRPO, policy=model, tokenizer=tok, options=GRPOConfig(beta=0.0), evaluate_fn=lambda run: {})


def run_rlbook(name: str, steps: int) -> dict:
    from rlbook.train import read_metrics
    model, tok = build_model(name)
    out = tempfile.mkdtemp()
    train_rlbook(name, steps, out, model, tok)
    rows = [r for r in read_metrics(f"{out}/metrics.jsonl") if "reward/mean" in r]
    shutil.rmtree(out, ignore_errors=True)  # the run's checkpoint: 1.6 GB for SmolLM2
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]  # step k's duration, k >= 1
    return {"s_per_step": statistics.median(times), "len_mean": statistics.mean(r["len/mean"] for r in rows),
            "peak_rss_mb": peak_rss_mb(), "params": sum(p.numel() for p in model.parameters())}


def run_trl(name: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from rlbook.tasks import answers_match, extract_answer
    model, tok = build_model(name)
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in prompts(PROMPTS * (steps + 2))])

    def reward(completions, answer, **kw):
        return [1.0 if answers_match(extract_answer(c), a) else 0.0 for c, a in zip(completions, answer)]

    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.time())

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, max_completion_length=NEW_TOKENS,
        max_steps=steps, learning_rate=1e-6, beta=0.0, loss_type="grpo", scale_rewards="group", temperature=1.0,
        use_cpu=True, bf16=precision() == "bf16", gradient_checkpointing=False, report_to="none", save_strategy="no",
        optim=OPTIM, logging_steps=1, dataloader_num_workers=0, log_completions=False, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"s_per_step": statistics.median(step_times([t0] + stamps)),
            "len_mean": statistics.mean(lens) if lens else float("nan"),
            "peak_rss_mb": peak_rss_mb(), "params": sum(p.numel() for p in model.parameters())}


def run_roofline(name: str) -> dict:
    import torch
    model, tok = build_model(name)
    return roofline(model, tok, [e.prompt for e in prompts(PROMPTS)], GROUP, NEW_TOKENS, torch.get_num_threads())


def main() -> int:
    started = start(__doc__, "12 tiny, 4 SmolLM2", THREADS, {"rlbook": run_rlbook, "trl": run_trl,
                                                             "roofline": lambda name, steps: run_roofline(name)})
    if started is None:
        return 0
    a, version = started
    print(f"rlbook GRPO vs TRL {version} GRPOTrainer: {PROMPTS} prompts x {GROUP} completions x "
          f"{NEW_TOKENS} new tokens, 1 optimizer step per batch, {a.precision}, beta=0, {a.threads} threads, {a.reps} "
          f"alternating runs per side; load average before: {os.getloadavg()[0]:.1f}", flush=True)

    def roofline_of(name: str) -> None:  # rlbook's step against the machine, in a process of its own
        roof = run_child(__file__, ("roofline", name, 0, a.threads), a.threads)
        print_roofline(roof)
        append_csv("roofline", [{**stamp(), "model": name, "threads": a.threads,
                                 **{k: round(v, 4) if isinstance(v, float) else v for k, v in roof.items()}}])

    compare(__file__, "grpo", a, version, lambda name: 12 if name == "tiny" else 4, extra_fields=("len_mean",),
            extra=lambda rs: f"   mean completion length {statistics.mean(r['len_mean'] for r in rs):.1f}",
            after=roofline_of)
    return 0


if __name__ == "__main__":
    sys.exit(main())
