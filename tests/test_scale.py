"""Chapter scale: several processes (launchers, configs, per-process memory) and the sampler engines (--generator)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CLI, ENV
from rlbook.dense_credit import IS_CORRECTIONS
from rlbook.grpo import GRPO, grpo_loss
from rlbook.logprobs import completion_logprobs, kl_k3, seq_mean
from rlbook.lora import memory_estimate
from rlbook.models import RLBookError, load_policy
from rlbook.ppo import clipped_surrogate
from rlbook.rollout import generate
from rlbook.scale import SHARDED, CopySampler, StandInLLM, VLLMSampler, per_process_memory, rollout_from_tokens
from rlbook.tasks import get_task
from rlbook.train import build_run, resolve_model, train

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def policy():
    return load_policy(resolve_model("tiny-sft", "addition", progress=False), device="cpu")


PROMPTS = ["12+34=", "7+8=", "305+96=", "999+1="]


def token_lists(ro):
    return ([ids[m.bool()].tolist() for ids, m in zip(ro.completion_ids, ro.completion_mask)],
            [lp[m.bool()].tolist() for lp, m in zip(ro.logp, ro.completion_mask)])


@pytest.mark.parametrize("max_new_tokens", [3, 8])  # 3: some rows cut by the budget, some ended; 8: all end with EOS
def test_rollout_from_tokens_rebuilds_the_samplers_rollout(policy, max_new_tokens):
    model, tok = policy
    ro = generate(model, tok, PROMPTS, group_size=3, max_new_tokens=max_new_tokens,
                  generator=torch.Generator().manual_seed(1))
    ids, lps = token_lists(ro)
    back = rollout_from_tokens(tok, PROMPTS, ids, lps, group_size=3)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logp", "truncated"):
        assert torch.equal(getattr(back, name), getattr(ro, name)), name
    assert back.completions == ro.completions and back.prompts == ro.prompts
    assert 0 < int(ro.truncated.sum()) < len(ids) if max_new_tokens == 3 else not ro.truncated.any()


def test_an_engine_row_that_ends_early_on_another_end_token_is_not_truncated(policy):
    _, tok = policy
    other_end = tok.pad_token_id if tok.pad_token_id != tok.eos_token_id else 2  # a stop id that is not the tokenizer's EOS
    ids = [[5, 6, other_end], [5, 6, 7, 8], [5, tok.eos_token_id]]
    ro = rollout_from_tokens(tok, ["1+1=", "2+2=", "3+3="], ids, [[-0.1] * len(c) for c in ids], max_new_tokens=4)
    assert ro.truncated.tolist() == [False, True, False]
    assert rollout_from_tokens(tok, ["1+1="], ids[:1], [[-0.1] * 3]).truncated.tolist() == [True]  # no budget given


def test_rollout_from_tokens_refuses_what_an_engine_cannot_mean(policy):
    _, tok = policy
    with pytest.raises(RLBookError, match="returned 1 completions"):
        rollout_from_tokens(tok, PROMPTS[:2], [[5]], [[-0.1]])
    with pytest.raises(RLBookError, match="completion 1: 2 tokens and 1 log-probs"):
        rollout_from_tokens(tok, PROMPTS[:2], [[5], [5, 6]], [[-0.1], [-0.2]])
    with pytest.raises(RLBookError, match="at least one token"):
        rollout_from_tokens(tok, PROMPTS[:1], [[]], [[]])


def test_vllm_sampler_on_the_stand_in_engine(policy):
    "Weights arrive by name (all of them, cache reset); the engine's rollout is the book's sampler's on the seed it drew."
    model, tok = policy
    engine = StandInLLM(load_policy("tiny", device="cpu", seed=1)[0], tok)
    sampler = VLLMSampler(model, tok, llm=engine)
    runner = engine.llm_engine.model_executor.driver_worker.model_runner.model
    before = generate(runner.module, tok, PROMPTS, max_new_tokens=4, temperature=0)
    sampler.sync(model)
    assert set(runner.loaded) == set(model.state_dict()) and engine.prefix_resets == 1
    assert all(torch.equal(a, b) for a, b in zip(runner.module.state_dict().values(), model.state_dict().values()))
    after = generate(runner.module, tok, PROMPTS, max_new_tokens=4, temperature=0)
    assert before.completions != after.completions  # the engine really had other weights before the sync
    ro = sampler.generate(PROMPTS, group_size=2, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    seed = int(torch.randint(0, 2 ** 30, (1,), generator=torch.Generator().manual_seed(5)))
    for i, p in enumerate(PROMPTS):  # prompt i sampled on its own seed, seed + i * G: the book's sampler on that seed
        mine = generate(model, tok, [p], group_size=2, max_new_tokens=6, generator=torch.Generator().manual_seed(seed + 2 * i))
        for r in range(2):
            a, b = ro.completion_mask[2 * i + r].bool(), mine.completion_mask[r].bool()
            assert ro.completion_ids[2 * i + r][a].tolist() == mine.completion_ids[r][b].tolist()
            assert torch.allclose(ro.logp[2 * i + r][a], mine.logp[r][b])
            assert bool(ro.truncated[2 * i + r]) == bool(mine.truncated[r])


def test_copy_sampler_sync_and_dtype(policy):
    model, tok = policy
    s = CopySampler(model, tok, torch.bfloat16)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # the trainer moves
    try:
        assert not torch.equal(next(s.model.parameters()).float(), next(model.parameters()).to(torch.bfloat16).float())
        s.sync(model)
        assert next(s.model.parameters()).dtype == torch.bfloat16
        assert torch.equal(next(s.model.parameters()), next(model.parameters()).to(torch.bfloat16))
    finally:
        with torch.no_grad():
            next(model.parameters()).sub_(0.5)


@pytest.mark.parametrize("mode", sorted(IS_CORRECTIONS))
def test_sampler_correction_recomputes_the_trainers_logprobs(tmp_path, mode):
    run = build_run(GRPO.config(generator="bf16", vllm_importance_sampling_mode=mode, batch_size=32, device="cpu",
                                progress=False, out=str(tmp_path)), GRPO)
    batch, stats = GRPO.collect(run)
    mask = batch["completion_mask"]
    mine = completion_logprobs(run.model, batch["input_ids"], batch["attention_mask"], mask.shape[1])["logp"] * mask
    assert torch.allclose(batch["logp_old"], mine, atol=1e-6)  # the trainer's, not the engine's
    assert (batch["logp_sampler"] - batch["logp_old"]).abs().max() > 1e-4  # bf16's log-probs differ
    C = run.cfg.vllm_importance_sampling_clip_max
    assert torch.equal(batch["is_weight"], IS_CORRECTIONS[mode](batch["logp_old"], batch["logp_sampler"], mask, cap=C))
    ratio = torch.exp(batch["logp_old"] - batch["logp_sampler"])
    if mode == "token_truncate":  # naive: min(ratio, C) on real tokens
        assert torch.allclose(batch["is_weight"], torch.minimum(ratio, torch.tensor(C)) * mask)
    k1 = float(((batch["logp_sampler"] - batch["logp_old"]) * mask).sum() / mask.sum())
    assert stats["kl/sampler"] == pytest.approx(k1, abs=1e-9)
    assert {"is/weight_mean", "is/truncfrac"} <= set(stats)


def test_grpo_loss_weighs_the_surrogate_not_the_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(4, 5, generator=g) - 2
    old, ref = logp + 0.1 * torch.randn(4, 5, generator=g), logp + 0.2 * torch.randn(4, 5, generator=g)
    adv, mask = torch.randn(4, generator=g), (torch.rand(4, 5, generator=g) > 0.2).float()
    w = torch.rand(4, 5, generator=g) * 2
    loss, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, is_weight=w)
    obj, _ = clipped_surrogate(torch.exp(logp - old), adv[:, None])
    naive = seq_mean(-w * obj + 0.1 * kl_k3(logp, ref), mask)
    assert torch.allclose(loss, naive)
    assert not torch.allclose(loss, grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)[0])


def test_a_copy_engine_trains_exactly_as_the_policy_does(tmp_path):
    "The whole engine path (sync, sample, rebuild, re-score, weigh) with no mismatch: the builtin run's update, to rounding."
    runs = {}
    for engine in ("builtin", "copy"):
        cfg = GRPO.config(generator=engine, steps=2, batch_size=64, eval_n=8, device="cpu", progress=False,
                          out=str(tmp_path / engine))
        runs[engine] = train(cfg, GRPO, make_optimizer=lambda params, c: torch.optim.SGD(params, lr=0.05))  # Adam's
        # first step divides by |g|, so float noise in a near-zero gradient would become a whole step
    a, b = runs["builtin"].model.state_dict(), runs["copy"].model.state_dict()
    start = load_policy(resolve_model(GRPO.defaults["model"], "addition", progress=False), device="cpu")[0].state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    rows = [json.loads(x) for x in (tmp_path / "copy" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl/sampler"]) < 1e-6 and rows[0]["is/weight_mean"] == pytest.approx(1.0, abs=1e-5)


def test_a_bf16_engine_logs_its_mismatch_and_can_go_uncorrected(tmp_path):
    cfg = GRPO.config(generator="bf16", steps=1, batch_size=64, eval_n=8, device="cpu", progress=False,
                      vllm_importance_sampling_correction=False, out=str(tmp_path))
    train(cfg, GRPO)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "kl/sampler" in row and "is/weight_mean" not in row


@pytest.mark.parametrize("args, needle", [
    (["grpo", "--generator", "vllm"], "needs vLLM, which is not installed: pip install 'rlbook[vllm]'"),
    (["grpo", "--generator", "fast"], "--generator must be one of builtin, copy, bf16, vllm"),
    (["dpo", "--generator", "bf16"], "dpo's loss does not take the importance weights"),
    (["grpo", "--task", "guess_number", "--model", "tiny-sft", "--generator", "copy"], "played turn by turn"),
    (["grpo", "--vllm-importance-sampling-mode", "tis"], "--vllm-importance-sampling-mode must be one of"),
    (["grpo", "--vllm-importance-sampling-clip-max", "0.5"], "--vllm-importance-sampling-clip-max must be a finite number >= 1"),
])
def test_engine_settings_refused_in_one_line(tmp_path, args, needle):
    p = subprocess.run(CLI + ["train", *args, "--steps", "1", "--out", str(tmp_path / "run")], env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_per_process_memory_splits_what_the_table_says():
    one = memory_estimate("tiny", batch_size=64)
    assert per_process_memory("tiny", strategy="ddp", processes=1, batch_size=64) == one
    half = memory_estimate("tiny", batch_size=32)
    for strategy, parts in SHARDED.items():
        est = per_process_memory("tiny", strategy=strategy, processes=2, batch_size=64)
        for part in ("weights", "gradients", "optimizer"):
            assert est[part] == (-(-half[part] // 2) if part in parts else half[part]), (strategy, part)
        assert est["reference"] == half["reference"]  # never sharded here
        assert est["peak"] <= half["peak"]
    with pytest.raises(RLBookError, match="strategy must be one of"):
        per_process_memory("tiny", strategy="zero4")
    with pytest.raises(RLBookError, match="cannot be split over 3 processes"):
        per_process_memory("tiny", processes=3, batch_size=64)


def test_the_accelerate_configs_are_valid_and_say_how_to_launch():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    files = {f.stem: f for f in sorted((ROOT / "configs").glob("*.yaml"))}
    assert list(files) == ["ddp", "fsdp", "zero2", "zero3"]
    for name, f in files.items():
        text = f.read_text()
        assert text.startswith("# ") and f"accelerate launch --config_file configs/{name}.yaml" in text and "torchrun" in text
        cfg = ClusterConfig.from_yaml_file(str(f))  # accelerate's own reader: unknown keys are an error
        assert cfg.num_processes >= 2 and str(getattr(cfg.mixed_precision, "value", cfg.mixed_precision)) == "no"
    assert ClusterConfig.from_yaml_file(str(files["ddp"])).distributed_type.value == "MULTI_GPU"

    def launch_env(name):  # what `accelerate launch --config_file configs/NAME.yaml` sets for the processes
        args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
            ["--config_file", str(files[name]), "train.py"]))
        if name == "fsdp":
            return prepare_multi_gpu_env(args)
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]

    env = launch_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"  # the loop refuses version 1
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    for stage in ("2", "3"):
        env = launch_env(f"zero{stage}")
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage


@pytest.mark.parametrize("kind, case, match", [
    ("FSDP", "fsdp1", "FSDP version 1 is not supported: set fsdp_version: 2"),
    ("FSDP", "peft", "--use-peft with FSDP is not supported"),
    ("FSDP", "engine", "--generator copy with FSDP is not supported"),
    ("FSDP", "environment", "guess_number with FSDP is not supported.*number of turns"),
    ("DEEPSPEED", "peft", "--use-peft with DeepSpeed is not supported"),
    ("DEEPSPEED", "environment", "guess_number with DeepSpeed is not supported"),
    ("DEEPSPEED", "resume", "--resume with DeepSpeed is not supported: its ZeRO optimizer keeps its state in per-process"),
    ("DEEPSPEED", "modules", "DeepSpeed wraps one model per engine, and this method builds more \\(value: a critic"),
])
def test_what_a_split_cannot_run_is_refused_in_one_line(kind, case, match):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import rlbook.agents  # noqa: F401  (registers guess_number)
    from rlbook.train import check_sharding
    acc = SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=case != "fsdp1")
    cfg = GRPO.config(use_peft=case == "peft", generator="copy" if case == "engine" else "builtin",
                      task="guess_number" if case == "environment" else "addition", resume=case == "resume")
    modules = {"value": torch.nn.Linear(1, 1)} if case == "modules" else {}
    with pytest.raises(RLBookError, match=match):
        check_sharding(cfg, acc, get_task(cfg.task), modules)
    acc.is_fsdp2 = True
    check_sharding(GRPO.config(), acc, get_task("addition"), {})  # the same split, with what it can run


def test_two_processes_from_the_command_line(tmp_path):
    "torchrun in front of `rlbook train`: one summary, the run's folder written once, a checkpoint that --resume reads."
    out = tmp_path / "two"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "rlbook.cli", "train", "grpo",
           "--batch-size", "32", "--steps", "2", "--eval-n", "8", "--out", str(out)]
    p = subprocess.run(cmd, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("held-out accuracy") == 1 and "over 2 processes" in p.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    p = subprocess.run(cmd[:-6] + ["--steps", "3", "--eval-n", "8", "--out", str(out), "--resume"],
                       env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_reference_critic_and_engine_follow_the_policys_device_and_dtype(tmp_path):
    "place(): the frozen reference, PPO's critic (backbone; its head stays float32) and a sampler copy sit with the policy."
    from transformers import PreTrainedModel

    from rlbook.rlhf import PPO
    model, tok = load_policy(resolve_model("tiny-sft", "addition", progress=False), device="cpu", dtype=torch.bfloat16)
    for method in (GRPO, PPO):
        run = build_run(method.config(device="cpu", progress=False, out=str(tmp_path / method.name)), method,
                        policy=model, tokenizer=tok)
        assert run.ref is not None and all(p.dtype == torch.bfloat16 for p in run.ref.parameters())
        for name, m in {"ref": run.ref, **run.modules}.items():
            assert all(p.device == run.device for p in m.parameters()), name
            for sub in m.modules():
                if isinstance(sub, PreTrainedModel):
                    assert all(p.dtype == torch.bfloat16 for p in sub.parameters()), name
        if method is PPO:
            backbone = {id(p) for sub in run.modules["value"].modules() if isinstance(sub, PreTrainedModel)
                        for p in sub.parameters()}
            head = [p for p in run.modules["value"].parameters() if id(p) not in backbone]
            assert head and all(p.dtype == torch.float32 for p in head)
    engine = CopySampler(model, tok, torch.float32)
    assert all(p.device == next(model.parameters()).device and p.dtype == torch.float32 for p in engine.model.parameters())


def test_an_engine_without_its_chapter_imported_is_one_clear_error(tmp_path):
    code = ("from rlbook.grpo import GRPO\nfrom rlbook.train import train\n"
            f"train(GRPO.config(generator='bf16', steps=1, out={str(tmp_path / 'r')!r}), GRPO)")
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "import rlbook.scale first" in p.stderr.splitlines()[-1], p.stderr[-500:]


def test_memory_command_splits_over_processes():
    base = ["memory", "--model", "tiny", "--batch-size", "64", "--gpu-gb"]
    one = subprocess.run(CLI + base, env=ENV, capture_output=True, text=True)
    eight = subprocess.run(CLI + base + ["--processes", "8", "--strategy", "zero3"], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0 and eight.returncode == 0, eight.stderr

    def mib(out, part):
        line = next(x for x in out.splitlines() if x.strip().startswith(part))
        v, unit = line.split()[1:3]
        return float(v) * (1024 if unit == "GiB" else 1)

    assert "one of 8 processes (zero3)" in eight.stdout
    for part in ("weights", "optimizer"):
        assert mib(eight.stdout, part) == pytest.approx(mib(one.stdout, part) / 8, rel=0.02, abs=0.1)
    assert mib(eight.stdout, "reference") == pytest.approx(mib(one.stdout, "reference"), abs=0.1)
    bad = subprocess.run(CLI + base + ["--processes", "3"], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "x --processes 3 must divide the 64 sequences" in bad.stderr


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    "A Qwen2-architecture model from a small config, with a tokenizer built here (no download)."
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlbook.models import CHAR_VOCAB, build_char_tokenizer
    folder = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(CHAR_VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=1, eos_token_id=1, pad_token_id=0)).save_pretrained(folder)
    build_char_tokenizer(model_max_length=128).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method, extra", [
    ("sft", ["--use-peft", "--gradient-checkpointing"]),
    ("grpo", ["--group-size", "4", "--use-peft", "--gradient-checkpointing"]),
    ("grpo", ["--group-size", "4"]),
    ("dpo", ["--use-peft", "--gradient-checkpointing"]),
])
def test_a_qwen2_model_trains_from_the_command_line(qwen2_folder, tmp_path, method, extra):
    "The real-model path of the GPU recipes (a Qwen2 architecture, a folder on disk) through `rlbook train`, on a CPU."
    out = tmp_path / "run"
    p = subprocess.run(CLI + ["train", method, "--model", str(qwen2_folder), "--steps", "2", "--batch-size", "16",
                              "--eval-n", "8", "--out", str(out), "--no-progress", *extra],
                       env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "held-out accuracy" in p.stdout and len((out / "metrics.jsonl").read_text().splitlines()) == 3
    saved = out / "checkpoint" / "model"
    assert (saved / ("adapter_config.json" if "--use-peft" in extra else "config.json")).is_file()


def test_a_deepspeed_config_without_deepspeed_says_how_to_install(tmp_path, monkeypatch):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RLBookError, match=r"asks for DeepSpeed, which is not installed: pip install 'rlbook\[deepspeed\]'"):
        train(GRPO.config(steps=1, device="cpu", progress=False, out=str(tmp_path / "r")), GRPO)
    assert not (tmp_path / "r").exists()
