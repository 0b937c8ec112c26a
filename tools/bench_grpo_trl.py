"""Time rlbook's GRPO against TRL's GRPOTrainer at equal work, on the CPU.

Same model, same prompts (addition), 8 prompts x 4 completions x up to 32 new tokens per step, one optimizer
step per batch, fp32, beta = 0 (no reference model), sequence-mean ("grpo") loss, no gradient checkpointing,
2 threads. Each side runs in its own subprocess so that its peak RSS is its own. Prints seconds per optimizer
step (median over the timed steps, the first step excluded) and peak RSS for both, and their ratios.

    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_grpo_trl.py                 # tiny GPT-2 and SmolLM2-135M
    OMP_NUM_THREADS=2 .venv/bin/python tools/bench_grpo_trl.py --models tiny  # the tiny model only

TRL is an optional extra (`pip install trl`); without it the script says so and exits 0.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS, GROUP, NEW_TOKENS, THREADS = 8, 4, 32, 2


def build_model(name: str):
    "The benchmark's policy: 'tiny' = a ~0.4M-parameter character GPT-2 (2 layers x 128), or 'smollm2-135m'."
    import torch
    from transformers import GPT2LMHeadModel
    from rlbook.models import CHAR_VOCAB, build_char_tokenizer, load_policy, prepare_policy, tiny_config
    if name == "tiny":
        cfg = tiny_config(len(CHAR_VOCAB), n_layer=2, n_embd=128, n_head=4)
        torch.manual_seed(0)
        model, tok = GPT2LMHeadModel(cfg), build_char_tokenizer(cfg.n_positions)
        return prepare_policy(model, tok, torch.device("cpu"), torch.float32)
    return load_policy(name, device="cpu", dtype="float32")


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_rlbook(name: str, steps: int) -> dict:
    from rlbook.grpo import GRPO, GRPOConfig
    from rlbook.train import read_metrics, train
    model, tok = build_model(name)
    out = tempfile.mkdtemp()
    cfg = GRPO.config(model=name, steps=steps, batch_size=PROMPTS * GROUP, group_size=GROUP, lr=1e-6,
                      max_new_tokens=NEW_TOKENS, temperature=1.0, out=out, progress=False, device="cpu")
    train(cfg, GRPO.collect, GRPO.loss, policy=model, tokenizer=tok, options=GRPOConfig(beta=0.0),
          evaluate_fn=lambda run: {})
    rows = [r for r in read_metrics(f"{out}/metrics.jsonl") if "reward/mean" in r]
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]  # step k's duration, k >= 1
    return {"s_per_step": statistics.median(times), "len_mean": statistics.mean(r["len/mean"] for r in rows),
            "peak_rss_mb": peak_rss_mb(), "params": sum(p.numel() for p in model.parameters())}


def run_trl(name: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from rlbook.tasks import answers_match, extract_answer, get_task
    model, tok = build_model(name)
    task = get_task("addition")
    ex = task.sample(PROMPTS * (steps + 2), seed=0, split="train")
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in ex])

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
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, log_completions=False, disable_tqdm=True, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    t0 = time.time()
    trainer.train()
    stamps.insert(0, t0)
    times = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # steps 1.. (the first includes start-up)
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"s_per_step": statistics.median(times), "len_mean": statistics.mean(lens) if lens else float("nan"),
            "peak_rss_mb": peak_rss_mb(), "params": sum(p.numel() for p in model.parameters())}


def child(which: str, name: str, steps: int, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    res = (run_rlbook if which == "rlbook" else run_trl)(name, steps)
    print("RESULT " + json.dumps(res), flush=True)


def measure(which: str, name: str, steps: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, __file__, "--child", which, name, str(steps), str(threads)], env=env,
                       capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{which} on {name} failed:\n{p.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], help="'tiny' and/or 'smollm2-135m'")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per side (default: 12 tiny, 4 SmolLM2)")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch / OpenMP threads per side")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]), int(a.child[3]))
        return 0
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed, so there is nothing to compare with: `pip install trl` (optional extra) "
              "and run again.")
        return 0
    import trl
    print(f"rlbook GRPO vs TRL {trl.__version__} GRPOTrainer: {PROMPTS} prompts x {GROUP} completions x "
          f"{NEW_TOKENS} new tokens, 1 optimizer step per batch, fp32, beta=0, {a.threads} threads; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    for name in a.models:
        steps = a.steps or (12 if name == "tiny" else 4)
        res = {w: measure(w, name, steps, a.threads) for w in ("rlbook", "trl")}
        r, t = res["rlbook"], res["trl"]
        print(f"\n{name} ({r['params'] / 1e6:.2f}M parameters, {steps} steps each, median of steps 2..{steps})")
        for w in ("rlbook", "trl"):
            print(f"  {w:7s} {res[w]['s_per_step']:8.3f} s/step   peak RSS {res[w]['peak_rss_mb']:7.0f} MB   "
                  f"mean completion length {res[w]['len_mean']:.1f}")
        print(f"  speed-up (TRL s/step / rlbook s/step): {t['s_per_step'] / r['s_per_step']:.2f}x   "
              f"memory (rlbook / TRL peak RSS): {r['peak_rss_mb'] / t['peak_rss_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
