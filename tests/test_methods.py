"""Every method of the command line, one step each on the tiny model: its batch holds only fields of `Batch`,
every metric it logs is in the glossary `METRICS` (chapter train), and the models its setup builds share the
run's device and, for their language-model backbones, the policy's dtype."""
import dataclasses

import pytest
import torch
from transformers import PreTrainedModel

from rlbook.cli import METHODS
from rlbook.models import load_policy
from rlbook.train import build_run, check_batch, read_metrics, train, undocumented_metrics

torch.set_num_threads(1)


def small(method, **over):  # a one-step configuration of the method and options that keep the step small
    group = method.defaults.get("group_size", 1)
    kw = dict(model="tiny", steps=1, batch_size=max(8, group), eval_n=4, eval_every=0, max_new_tokens=6,
              progress=False, device="cpu",
              minibatch_size=4 if method.defaults.get("minibatch_size") else 0)
    cfg = method.config(**{**kw, **over})
    opts = method.options
    for name, value in (("n_pairs", 16), ("eval_pairs", 8)):  # a small preference data set, a short RM evaluation
        if opts is not None and name in {f.name for f in dataclasses.fields(opts)}:
            opts = dataclasses.replace(opts, **{name: value})
    return cfg, opts


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_fields_and_metric_names(name, tmp_path):
    method = METHODS[name]
    cfg, opts = small(method, out=str(tmp_path / name))
    keys = set()

    def collect(run):  # the method's own collect, its batch keys recorded
        batch, stats = method.collect(run)
        keys.update(batch)
        return batch, stats

    train(cfg, dataclasses.replace(method, collect=collect), options=opts)
    check_batch(dict.fromkeys(keys), name)  # one name, one documented meaning
    logged = {k for row in read_metrics(tmp_path / name / "metrics.jsonl") for k in row}
    assert {"loss", "grad_norm", "lr", "eval/accuracy"} <= logged
    assert not undocumented_metrics(logged), f"{name} logs names the glossary (rlbook.train.METRICS) lacks"


@pytest.fixture(scope="module")
def reward_model_run(tmp_path_factory):  # a float32 reward model on disk, for PPO's setup to load
    out = tmp_path_factory.mktemp("rm") / "rm"
    method = METHODS["rm"]
    cfg, opts = small(method, out=str(out))
    train(cfg, method, options=opts)
    return str(out)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_setup_places_its_models_on_the_runs_device_and_dtype(name, reward_model_run):
    "A bfloat16 policy: the reference and every module's backbone are bfloat16 on the run's device; heads keep float32."
    method = METHODS[name]
    cfg, opts = small(method)
    if name == "ppo":  # a reward model loaded from disk in float32, and the critic copied from it
        opts = dataclasses.replace(opts, reward_model=reward_model_run, critic_init="reward")
    policy, tok = load_policy("tiny", device="cpu", dtype=torch.bfloat16, seed=0)
    run = build_run(cfg, method, options=opts, policy=policy, tokenizer=tok)
    models = ([run.ref] if run.ref is not None else []) + list(run.modules.values()) + [run.policy]
    backbones = [m for model in models for m in model.modules() if isinstance(m, PreTrainedModel)]
    assert backbones
    for m in backbones:
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16}, (name, type(m).__name__)
        assert {p.device for p in m.parameters()} == {run.device}, name
    for model in models:  # every parameter on the run's device, heads included
        assert {p.device for p in model.parameters()} <= {run.device}, name
    if name == "ppo":
        assert run.modules["rms"][0].value_head.head.weight.dtype == torch.float32  # the RM's head keeps its dtype
        assert isinstance(run.ref, PreTrainedModel) and not any(p.requires_grad for p in run.ref.parameters())


def test_python_api_builds_the_warm_start_a_default_names(tmp_path):
    "`train(GRPO.config(), GRPO)` in a fresh process, with nothing but rlbook.grpo imported: 'tiny-sft-sloppy' resolves."
    import json
    import subprocess
    import sys
    out = tmp_path / "run"
    code = ("from rlbook.grpo import GRPO\nfrom rlbook.train import train\n"
            f"train(GRPO.config(steps=1, batch_size=8, eval_n=4, out={str(out)!r}, progress=False, device='cpu'), GRPO)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["model"] == "tiny-sft-sloppy"  # the name, as the user gave it
    assert (out / "checkpoint" / "model" / "config.json").exists()
