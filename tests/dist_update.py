"""One update of each named method, run either as one process or under `torchrun --nproc_per_node 2` (gloo on CPU).

    python tests/dist_update.py OUT sft grpo dpo ...      (or torchrun --nproc_per_node 2 tests/dist_update.py ...)

With RLBOOK_TEST_SPLIT=fsdp, zero2 or zero3, the training state is split by configs/SPLIT.yaml (accelerate's FSDP2 or
DeepSpeed on CPU processes, see below). Other modes, in place of the methods: `stats` (over_processes), `lockstep`
(generate with fully_shard weights), `resume` (two steps straight vs. resumed), `cli FLAGS...` (`rlbook train FLAGS`).

With RLBOOK_PER_PROCESS_STATS=1, each process whitens with its own share's statistics (the bug chapter `scale`
measures). Writes each method's updated parameters (and its modules', e.g. PPO's critic) to OUT/METHOD.pt (main process) and
the logged metrics row to OUT/METHOD.json. The test compares one process with two.

Sampling is the one thing that differs by design: each process draws from its own stream, seeded by
(seed, step, rank), so two processes sample other completions than one. To compare the *update*, this script
samples every prompt group on its own, from a stream seeded by the group's place in the whole step (not by
the process that holds it): both runs then train on the same completions, and everything after sampling
(scores, reference log-probs, advantages, whitening, normalisers, gradient averaging) is the library's own.
"""
import json
import os
import sys
from pathlib import Path

import torch

import rlbook.rollout as rollout
from rlbook.cli import METHODS
from rlbook.scale import rollout_from_tokens
from rlbook.rollout import sharded
from rlbook.train import step_seed, train, whole_state_dict

out = Path(sys.argv[1])
if sys.argv[2:] == ["stats"]:  # over_processes with statistics that differ between the processes, names included
    from accelerate import Accelerator

    from rlbook.train import over_processes
    acc = Accelerator(cpu=True)
    r = acc.process_index
    mine = {"reward/mean": 0.2 + r, "turns/total": 3 + r, **({"len/wrong": 4.0} if r == 1 else {}),
            "entropy": float("nan") if r == 0 else 0.5}
    got = {"means": over_processes(acc, mine), "parts": over_processes(acc, {"loss": 1.5 + r})}
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(got))
    sys.exit(0)
if sys.argv[2:] == ["lockstep"]:  # generate with weights sharded by torch's fully_shard: the samples of the whole model
    import copy

    from torch.distributed.fsdp import fully_shard

    from rlbook.models import load_policy
    from rlbook.rollout import generate
    from rlbook.tasks import get_task
    from rlbook.train import resolve_model
    torch.distributed.init_process_group("gloo")
    r = torch.distributed.get_rank()
    model, tok = load_policy(resolve_model("tiny-sft", "addition", False), device="cpu")  # the warm start: it ends its answers
    whole = copy.deepcopy(model)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    prompts = [e.prompt for e in get_task("addition").sample(3 + 2 * r, seed=r, split="test")]  # other prompts, other lengths
    got = {}
    for name, m in (("sharded", model), ("whole", whole)):
        ro = generate(m, tok, prompts, group_size=4, max_new_tokens=16, temperature=[0.3, 2.0][r],  # rank 1 rambles
                      generator=torch.Generator().manual_seed(r))
        got[name] = (ro.completion_ids, ro.logp, ro.completion_mask)
    lengths = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
    torch.distributed.all_gather(lengths, torch.tensor([got["whole"][0].shape[1]]))
    report = {"sharded": sharded(model), "plain": sharded(whole), "lengths": [int(x) for x in lengths],
              "same_tokens": torch.equal(got["sharded"][0], got["whole"][0]),
              "same_mask": torch.equal(got["sharded"][2], got["whole"][2]),
              "logp_gap": float((got["sharded"][1] - got["whole"][1]).abs().max())}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"lockstep{r}.json").write_text(json.dumps(report))
    sys.exit(0)
RANK = int(os.environ.get("RANK", "0"))
_generate = rollout.generate
STEP = {"n": 0}  # the step being sampled (one step per run here)


def groupwise_generate(model, tokenizer, prompts, *, generator=None, **kw):
    "generate, one prompt group at a time, each from the stream of its place in the whole step."
    if kw.get("temperature", 1.0) == 0:  # greedy (ReMax's baseline, evaluation): no stream to align
        return _generate(model, tokenizer, prompts, generator=generator, **kw)
    first = RANK * len(prompts)  # shards are contiguous and equal: this process holds groups first, first + 1, ...
    parts = [_generate(model, tokenizer, [p], generator=torch.Generator().manual_seed(step_seed(1234, STEP["n"], first + i)),
                       **kw) for i, p in enumerate(prompts)]
    rows = [(ids[m.bool()].tolist(), lp[m.bool()].tolist())
            for ro in parts for ids, m, lp in zip(ro.completion_ids, ro.completion_mask, ro.logp)]
    return rollout_from_tokens(tokenizer, prompts, [r[0] for r in rows], [r[1] for r in rows],  # the groups as one Rollout
                               group_size=kw.get("group_size", 1), temperature=kw.get("temperature", 1.0),
                               max_new_tokens=kw.get("max_new_tokens"), device=parts[0].completion_ids.device)


rollout.generate = groupwise_generate

SPLIT = os.environ.get("RLBOOK_TEST_SPLIT", "")  # fsdp, zero2 or zero3: the weights split by configs/SPLIT.yaml
if SPLIT:
    # accelerate's FSDP or DeepSpeed with the settings of configs/SPLIT.yaml, on CPU processes. accelerate offers them
    # only on GPU-like backends, but torch's fully_shard and DeepSpeed's CPU accelerator run on gloo: this script alone
    # tells accelerate that it has "GPUs" which are the CPU, after setting the environment `accelerate launch` would.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    import rlbook.train as _train
    launch, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(Path(__file__).parents[1] / "configs" / f"{SPLIT}.yaml"), "train.py"]))
    if SPLIT == "fsdp":
        split_env = prepare_multi_gpu_env(launch)
    else:
        launch.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        split_env = prepare_deepspeed_cmd_env(launch)[1]
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo without oneCCL)
    os.environ.update({k: v for k, v in split_env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_",
                                                                         "ACCELERATE_CONFIG_DS_FIELDS"))},
                      ACCELERATE_TORCH_DEVICE="cpu")
    PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: ("gloo",
                                                                                             DistributedType.MULTI_GPU)
    _train.on_cpu = lambda cfg: False

if os.environ.get("RLBOOK_PER_PROCESS_STATS") == "1":  # the bug chapter `scale` measures: each process's own statistics
    import rlbook.train as _train
    _train.Run.reduce_sum = property(lambda self: None)

SETTINGS = {  # one step each, SGD, a whole-batch minibatch (several minibatches would be drawn differently per process),
    # no clipping (the clipped update is the gradient's direction only: it would hide a wrong scale)
    "sft": dict(batch_size=16, lr=0.05),
    "grpo": dict(batch_size=16, group_size=4, lr=0.05, max_new_tokens=6, grad_accum=2),  # 2 micro-batches an update
    "lite_ppo": dict(batch_size=16, group_size=4, lr=0.05, max_new_tokens=6),
    "reinforce_pp": dict(batch_size=16, group_size=1, lr=0.05, max_new_tokens=6),
    "ppo": dict(batch_size=16, group_size=1, minibatch_size=0, epochs=1, lr=0.05, max_new_tokens=6),
    "dpo": dict(batch_size=16, lr=0.05, grad_accum=2),
}
if sys.argv[2:3] == ["cli"]:  # the command line, its flags after "cli", under the split of RLBOOK_TEST_SPLIT
    from rlbook.cli import main
    rollout.generate = _generate  # the library's own sampling
    sys.exit(main(["train", *sys.argv[3:], "--out", str(out)]))

if sys.argv[2:] == ["resume"]:  # two GRPO steps (AdamW) straight, and one step then a resumed second: the same weights
    from transformers import AutoModelForCausalLM

    def grpo(folder, steps, **kw):
        cfg = METHODS["grpo"].config(**{**SETTINGS["grpo"], "lr": 1e-3, "steps": steps, "warmup_steps": 0, "eval_n": 4,
                                        "out": str(out / folder), "device": "cpu", "progress": False, **kw})
        run = train(cfg, METHODS["grpo"])
        return run, whole_state_dict(run.model, main_only=True)

    run, straight = grpo("straight", 2)
    if SPLIT.startswith("zero"):  # DeepSpeed: the checkpoint holds the whole model, and --resume is refused
        from rlbook.models import RLBookError
        try:
            grpo("straight", 3, resume=True)
            refused = None
        except RLBookError as e:
            refused = str(e)
        if run.accelerator.is_main_process:
            from transformers.integrations import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()  # (ZeRO-3 would partition this load too, as in a training process)
            saved = AutoModelForCausalLM.from_pretrained(out / "straight" / "checkpoint" / "model").state_dict()
            (out / "resume.json").write_text(json.dumps({
                "checkpoint": max(float((saved[k] - straight[k]).abs().max()) for k in saved), "refused": refused,
                "sharded": sharded(run.model), "world": run.world}))
        sys.exit(0)
    _, first = grpo("resumed", 1)
    run, resumed = grpo("resumed", 2, resume=True)
    if run.accelerator.is_main_process:
        saved = AutoModelForCausalLM.from_pretrained(out / "resumed" / "checkpoint" / "model").state_dict()
        gaps = {"resume": max(float((straight[k] - resumed[k]).abs().max()) for k in straight),
                "checkpoint": max(float((saved[k] - resumed[k]).abs().max()) for k in saved),
                "second_step": max(float((straight[k] - first[k]).abs().max()) for k in straight),
                "sharded": sharded(run.model), "world": run.world}
        (out / "resume.json").write_text(json.dumps(gaps))
    sys.exit(0)

for name in sys.argv[2:]:
    method = METHODS[name]
    cfg = method.config(**{**SETTINGS[name], "steps": 1, "warmup_steps": 0, "eval_n": 4, "out": str(out / name),
                           "device": "cpu", "progress": False,
                           "max_grad_norm": 0.0})
    start = []

    def sgd(params, c):  # called once the policy and modules are built: their parameters before the update
        start.extend(p.detach().clone() for p in params)
        return torch.optim.SGD(params, lr=c.lr)

    run = train(cfg, method, make_optimizer=sgd)
    # split: the parameters may be this process's shards; the weights are compared whole, below
    moved = None if SPLIT else max(float((p.detach().cpu() - p0.cpu()).abs().max()) for p, p0 in zip(
        [p for p in run.policy.parameters() if p.requires_grad] +
        [p for m in run.modules.values() for p in m.parameters() if p.requires_grad], start))
    whole = {"policy": whole_state_dict(run.model, main_only=True),  # every process sends its shards
             **{key: whole_state_dict(run.accelerator.unwrap_model(m), main_only=True) for key, m in run.modules.items()}}
    if run.accelerator.is_main_process:
        weights = {f"{key}.{k}": v.detach().cpu() for key, sd in whole.items() for k, v in sd.items()}
        torch.save(weights, out / f"{name}.pt")
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        (out / f"{name}.json").write_text(json.dumps({**rows[0], "moved": moved}))
        print(name, "world", run.world, SPLIT, "sharded" if sharded(run.model) else "whole")
