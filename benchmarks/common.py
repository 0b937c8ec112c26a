"""What the benchmarks share: the two models, one child process per measurement, alternating sides
(A B A B, so that drift on a shared machine hits both), peak RSS, a CSV appended under
benchmarks/results/, and the roofline of this machine (measured matmul peak and memory bandwidth).
"""
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPTIM = "adamw_torch_fused"  # both sides' optimizer: TRL's default (transformers with torch >= 2.8), rlbook's --optim
PRECISION_ENV = "RLBOOK_BENCH_PRECISION"  # how the parent tells its children the precision of --precision


def precision() -> str:
    "'fp32', or 'bf16': bf16 autocast over fp32 weights on both sides (accelerate's mixed precision; TRL's bf16=True)."
    return os.environ.get(PRECISION_ENV, "fp32")


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


def step_times(stamps: list) -> list:
    "Durations of steps 2.. from a list of step-end times (the first step includes start-up and is dropped)."
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]


def run_child(script: str, args: list, threads: int) -> dict:
    "Run `script --child ARGS` in its own process (its own peak RSS); the dict it printed after RESULT."
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, script, "--child", *map(str, args)], env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{script} {' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")


def alternate(script: str, sides: tuple, args_of, reps: int, threads: int) -> dict:
    "A B A B ...: `reps` measurements of each side, interleaved. {side: [result dict per repetition]}."
    res = {s: [] for s in sides}
    for r in range(reps):
        for s in sides:
            res[s].append(run_child(script, args_of(s), threads))
            print(f"  rep {r + 1}/{reps} {s:7s} {res[s][-1]['s_per_step']:.3f} s/step", flush=True)
    return res


def spread(xs: list) -> str:
    return f"{statistics.median(xs):.3f} s/step (range {min(xs):.3f}-{max(xs):.3f})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def append_csv(name: str, rows: list) -> Path:
    "Append result rows (dicts with the same keys) to benchmarks/results/NAME.csv; header on first write."
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def stamp() -> dict:
    "When, where and under what load: columns every CSV row carries."
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit(), "load1": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}


def matmul_peak(dtype: str = "float32", n: int = 1024, reps: int = 3) -> float:
    "GFLOP/s of an n x n x n matmul in this process's threads (median of reps, after one warm-up): the compute roof."
    import torch
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def bandwidth(mb: int = 256, reps: int = 5) -> float:
    "GB/s of reading a large fp32 tensor (a sum over it, median of reps): the memory roof of decoding."
    import torch
    x = torch.ones(mb * 2 ** 20 // 4)
    x.sum()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def matmul_params(model) -> int:
    "Parameters that take part in matmuls (every 2-D weight; tied input/output embeddings counted once as the head)."
    seen, n = set(), 0
    for p in model.parameters():
        if p.dim() == 2 and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def roofline(model, tokenizer, prompts: list, group_size: int, new_tokens: int, threads: int, *,
             matmul_n: int = 1024, bandwidth_mb: int = 256) -> dict:
    """Time one sampling pass and one forward+backward of the training loss on its batch, and set them against
    the machine: forward+backward does about 6 x (matmul parameters) x (tokens) FLOPs; every decoding step reads
    all weights once, so B sequences decode at most at B x bandwidth / (weight bytes) tokens/s, and each decoded
    token costs 2 x (matmul parameters) FLOPs, so no faster than peak / (2 x matmul parameters) tokens/s either:
    the roof of decoding is the lower of the two."""
    import torch
    from rlbook.logprobs import completion_logprobs
    from rlbook.rollout import generate
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    gen_t, fb_t = [], []
    for _ in range(3):
        t = time.perf_counter()
        ro = generate(model, tokenizer, prompts, group_size=group_size, max_new_tokens=new_tokens, generator=g)
        gen_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask.shape[1])
        (out["logp"] * ro.completion_mask).sum().backward()
        fb_t.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    B, L = ro.input_ids.shape
    n = matmul_params(model)
    flops = 6 * n * B * L
    steps = ro.completion_ids.shape[1]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = bandwidth(bandwidth_mb)
    peak32, peak16 = matmul_peak("float32", matmul_n), matmul_peak("bfloat16", matmul_n)
    decode_s = statistics.median(gen_t)
    return {"fb_s": statistics.median(fb_t), "fb_gflops": flops / statistics.median(fb_t) / 1e9,
            "peak_fp32_gflops": peak32, "peak_bf16_gflops": peak16, "decode_s": decode_s,
            "decode_tok_s": B * steps / decode_s, "decode_bound_tok_s": B * bw * 1e9 / weight_bytes,
            "decode_compute_bound_tok_s": peak32 * 1e9 / (2 * n), "matmul_params": n,
            "bandwidth_gbs": bw, "decode_steps": steps, "rows": B}


def print_roofline(r: dict) -> None:
    print(f"  roofline (rlbook, fp32): forward+backward {r['fb_s']:.3f} s = {r['fb_gflops']:.1f} GFLOP/s, "
          f"{100 * r['fb_gflops'] / r['peak_fp32_gflops']:.0f}% of the measured matmul peak "
          f"{r['peak_fp32_gflops']:.0f} GFLOP/s (bf16 peak {r['peak_bf16_gflops']:.0f})")
    print(f"  roofline (rlbook, fp32): decoding {r['rows']} rows x {r['decode_steps']} steps in {r['decode_s']:.3f} s "
          f"= {r['decode_tok_s']:.0f} tokens/s; the bandwidth bound ({r['bandwidth_gbs']:.1f} GB/s read) is "
          f"{r['decode_bound_tok_s']:.0f} tokens/s, the compute bound {r['decode_compute_bound_tok_s']:.0f} tokens/s: "
          f"{min(r['decode_bound_tok_s'], r['decode_compute_bound_tok_s']) / r['decode_tok_s']:.1f}x below the lower")


def arguments(doc: str, default_steps: str, threads: int = 2):
    "The command line every benchmark shares (--models, --steps, --reps, --threads, and the hidden --child)."
    import argparse
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"], help="'tiny' and/or 'smollm2-135m'")
    ap.add_argument("--steps", type=int, default=0, help=f"optimizer steps per run (default: {default_steps})")
    ap.add_argument("--reps", type=int, default=2, help="runs of each side, alternating (A B A B)")
    ap.add_argument("--threads", type=int, default=threads, help="torch / OpenMP threads per side")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="fp32, or bf16 autocast over fp32 weights on both sides (written to *_bf16.csv)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    return ap.parse_args()


def trl_version() -> str | None:
    "TRL's version, or None after saying that it is not installed (it is an optional extra)."
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed, so there is nothing to compare with: `pip install trl` (optional extra) "
              "and run again.")
        return None
    import trl
    return trl.__version__


def start(doc: str, default_steps: str, threads: int, runners: dict):
    """Parse the command line. In a child process (`--child WHICH MODEL STEPS THREADS`), run runners[WHICH](MODEL,
    STEPS), print its result after RESULT and return None; otherwise (args, TRL's version), or None without TRL."""
    a = arguments(doc, default_steps, threads)
    if a.child:
        import torch
        which, name, steps, n = a.child
        torch.set_num_threads(int(n))
        print("RESULT " + json.dumps(runners[which](name, int(steps))), flush=True)
        return None
    os.environ[PRECISION_ENV] = a.precision  # the children inherit it
    version = trl_version()
    return None if version is None else (a, version)


def compare(script: str, benchmark: str, a, version: str, steps_of, extra_fields: tuple = (), extra=lambda rs: "",
            after=lambda name: None) -> None:
    """For each model: rlbook and TRL alternating, every run appended to benchmarks/results/BENCHMARK_vs_trl.csv,
    the report printed (with `extra` per side), then `after(model)`."""
    for name in a.models:
        steps = a.steps or steps_of(name)
        res = alternate(script, ("rlbook", "trl"), lambda s: (s, name, steps, a.threads), a.reps, a.threads)
        st = stamp()
        append_csv(f"{benchmark}_vs_trl" + ("" if a.precision == "fp32" else f"_{a.precision}"), [
            {**st, "benchmark": benchmark, "model": name, "side": s, "rep": i + 1, "steps": steps, "threads": a.threads,
             "trl": version, "s_per_step": round(r["s_per_step"], 4), "peak_rss_mb": round(r["peak_rss_mb"]),
             **{k: round(r[k], 2) for k in extra_fields}} for s in res for i, r in enumerate(res[s])])
        report(name, res, steps, st["load1"], extra)
        if a.precision == "fp32":  # the roofline is drawn against the fp32 matmul peak
            after(name)


def report(name: str, res: dict, steps: int, load1: float, extra=lambda rs: "") -> None:
    "Per side: s/step (median and range over the runs) and peak RSS; then the speed and memory ratios."
    med = {s: statistics.median(r["s_per_step"] for r in res[s]) for s in res}
    rss = {s: max(r["peak_rss_mb"] for r in res[s]) for s in res}
    print(f"\n{name} ({res['rlbook'][0]['params'] / 1e6:.2f}M parameters, {steps} steps per run, "
          f"median of steps 2..{steps}; load average {load1})")
    for s in res:
        print(f"  {s:7s} {spread([r['s_per_step'] for r in res[s]])}   peak RSS {rss[s]:7.0f} MB{extra(res[s])}")
    print(f"  speed-up (TRL s/step / rlbook s/step): {med['trl'] / med['rlbook']:.2f}x   "
          f"memory (rlbook / TRL peak RSS): {rss['rlbook'] / rss['trl']:.2f}")
