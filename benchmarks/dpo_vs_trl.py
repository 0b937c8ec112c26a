"""rlbook's DPO against TRL's DPOTrainer at equal work, on the CPU.

Same model, same preference pairs (addition prompts; chosen = a sentence with the right sum, rejected = one with
a wrong sum), 16 pairs per optimizer step, fp32 (or --precision bf16, as in grpo_vs_trl.py), beta = 0.1, sigmoid
loss, a frozen reference whose log-probs are computed every step (no precomputation), no gradient checkpointing,
AdamW as one fused kernel on both sides (TRL's default optimizer; rlbook's --optim adamw_torch_fused), 2
threads. Each side runs in its own process and the sides alternate (A B A B). Prints s/step (median of the
repetitions' medians, with their range), peak RSS and the ratios; appends every repetition to
benchmarks/results/dpo_vs_trl.csv with the load average.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dpo_vs_trl.py                 # tiny GPT-2 and SmolLM2-135M
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dpo_vs_trl.py --models tiny  # the tiny model only

TRL is an optional extra (`pip install trl`); without it the script says so and exits 0.
"""
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OPTIM, build_model, compare, peak_rss_mb, precision, start, step_times  # noqa: E402

PAIRS, THREADS, BETA = 16, 2, 0.1


def pairs(n: int) -> list:
    "n preference records: the prompt of an addition problem, a right and a wrong worked answer."
    from rlbook.tasks import get_task
    out = []
    for i, e in enumerate(get_task("addition").sample(n, seed=0, split="train")):
        wrong = str(int(e.answer) + 1 + i % 9)
        out.append({"prompt": e.prompt, "chosen": f"{e.answer} is the sum, checked digit by digit.",
                    "rejected": f"{wrong} is the sum, checked digit by digit."})
    return out


def run_rlbook(name: str, steps: int) -> dict:
    from rlbook.dpo import DPO, DPOConfig
    from rlbook.preference_data import PreferenceTask, validate_pairs
    from rlbook.models import frozen_copy
    from rlbook.rollout import model_context
    from rlbook.tasks import get_task
    from rlbook.train import read_metrics, train
    model, tok = build_model(name)
    out = Path(tempfile.mkdtemp())
    ref = frozen_copy(model)
    recs, st = validate_pairs(pairs(PAIRS * (steps + 2)), tok, context=model_context(ref))
    cfg = DPO.config(model=name, steps=steps, batch_size=PAIRS, lr=1e-6, out=str(out), progress=False, optim=OPTIM,
                     device="cpu", mixed_precision="bf16" if precision() == "bf16" else "no")
    data = PreferenceTask(get_task("addition"), recs, st)  # these pairs instead of sampled ones, and the reference
    method = dataclasses.replace(DPO, setup=lambda run: {"ref": ref, "task": data})
    train(cfg, method, policy=model, tokenizer=tok, options=DPOConfig(beta=BETA), evaluate_fn=lambda run: {})
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    shutil.rmtree(out, ignore_errors=True)  # the run's checkpoint: 1.6 GB for SmolLM2
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    return {"s_per_step": statistics.median(times), "peak_rss_mb": peak_rss_mb(),
            "params": sum(p.numel() for p in model.parameters())}


def run_trl(name: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from rlbook.models import frozen_copy
    model, tok = build_model(name)
    ref = frozen_copy(model)
    data = Dataset.from_list(pairs(PAIRS * (steps + 2)))
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.time())

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-6, beta=BETA, loss_type="sigmoid", precompute_ref_log_probs=False,
        use_cpu=True, bf16=precision() == "bf16", gradient_checkpointing=False, report_to="none", save_strategy="no",
        optim=OPTIM, logging_steps=1, dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    return {"s_per_step": statistics.median(step_times([t0] + stamps)), "peak_rss_mb": peak_rss_mb(),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> int:
    started = start(__doc__, "12 tiny, 5 SmolLM2", THREADS, {"rlbook": run_rlbook, "trl": run_trl})
    if started is None:
        return 0
    a, version = started
    print(f"rlbook DPO vs TRL {version} DPOTrainer: {PAIRS} pairs per step, {a.precision}, beta={BETA}, sigmoid "
          f"loss, reference log-probs every step, {a.threads} threads, {a.reps} alternating runs per side; "
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    compare(__file__, "dpo", a, version, lambda name: 12 if name == "tiny" else 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
