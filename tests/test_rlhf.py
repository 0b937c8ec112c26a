"""Tests of the RLHF chapter (rlbook.rlhf): value columns, ratio 1 on the first minibatch, advantages in a
degenerate setting, best-of-n bookkeeping, PPO through the one loop (task reward and reward model), and solutions."""
import math

import pytest
import torch

from rlbook.models import RLBookError, ValueHead, frozen_copy, load_policy
from rlbook.rlhf import PPO, PPOConfig, best_of_n_curve, bon_kl, check_ppo_options, critic_values
from rlbook.rollout import generate
from rlbook.tasks import get_task
from accelerate import Accelerator
from rlbook.train import Run, TrainConfig, build_run, read_metrics, train

torch.set_num_threads(1)


# ---------------------------------------------------------------- exercise solutions
def bon_distribution(p, scores, n):
    "Solution: P(best = i) = F(i)^n - F(i^-)^n with F the CDF in score order."
    order = scores.argsort()
    cdf = p[order].cumsum(0)
    prev = torch.cat([torch.zeros(1), cdf[:-1]])
    q = torch.empty_like(p)
    q[order] = cdf ** n - prev ** n
    return q


def explained_variance(value, returns, mask):
    "Solution."
    m = mask.bool()
    r, v = returns[m], value[m]
    return float(1 - (r - v).var(correction=0) / r.var(correction=0))


def test_bon_distribution_solution_and_kl_bound():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(6, generator=g); p /= p.sum()
    s = torch.randn(6, generator=g)
    for n in (1, 2, 5, 20):
        q = bon_distribution(p, s, n)
        assert abs(q.sum() - 1) < 1e-6
        kl = (q * (q / p).log()).sum().item()
        assert kl <= bon_kl(n) + 1e-6
    # Monte Carlo check of the distribution
    draws = torch.multinomial(p.expand(20000, 6), 3, replacement=True, generator=g)
    best = draws.gather(1, s[draws].argmax(1, keepdim=True)).squeeze(1)
    emp = torch.bincount(best, minlength=6).float() / 20000
    assert torch.allclose(emp, bon_distribution(p, s, 3), atol=0.015)


def test_explained_variance_solution():
    R = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]); M = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert abs(explained_variance(R, R, M) - 1) < 1e-6 and abs(explained_variance(torch.full_like(R, 2.5), R, M)) < 1e-6


# ---------------------------------------------------------------- pieces
def test_bon_curve_and_kl():
    assert bon_kl(1) == 0 and abs(bon_kl(64) - (math.log(64) - 63 / 64)) < 1e-12
    proxy = gold = torch.arange(8.0).view(1, 8)
    rows = best_of_n_curve(proxy, gold, [1, 2, 8])
    assert [r["gold"] for r in rows] == [3.5, 4.0, 7.0]
    with pytest.raises(RLBookError):
        best_of_n_curve(proxy, gold, [3])


def test_options_are_checked():
    check_ppo_options(PPOConfig())
    for bad in (PPOConfig(critic_init="x"), PPOConfig(ensemble="max"), PPOConfig(critic_init="reward"),
                PPOConfig(gold="digits")):
        with pytest.raises(RLBookError):
            check_ppo_options(bad)


@pytest.fixture(scope="module")
def start():
    from rlbook.sft import warm_start
    return str(warm_start(progress=False))


def _run(start, opts, batch_size=8):
    policy, tok = load_policy(start, device="cpu")
    critic = ValueHead(load_policy(start, device="cpu")[0], init_std=1.0)
    cfg = TrainConfig(model=start, batch_size=batch_size, max_new_tokens=6, device="cpu", progress=False)
    return Run(cfg=cfg, policy=policy, tokenizer=tok, task=get_task("addition"), accelerator=Accelerator(cpu=True),
               ref=frozen_copy(policy), modules={"value": critic}, options=opts)


def test_values_do_not_see_their_own_token(start):
    run = _run(start, PPOConfig())
    ro = generate(run.policy, run.tokenizer, ["1+2=", "30+40="], max_new_tokens=5,
                  generator=torch.Generator().manual_seed(1))
    T = ro.completion_ids.shape[1]
    v = critic_values(run.modules["value"], ro.input_ids, ro.attention_mask, T)
    for t in range(T):
        ids = ro.input_ids.clone(); ids[:, -T + t] = 7
        v2 = critic_values(run.modules["value"], ids, ro.attention_mask, T)
        assert torch.allclose(v[:, :t + 1], v2[:, :t + 1], atol=1e-5)


def test_collect_advantages_degenerate_case_and_ratio_one(start):
    run = _run(start, PPOConfig(beta=0.0, lam=1.0, whiten_adv=False))
    b, st = PPO.collect(run)
    m = b["completion_mask"]
    assert torch.allclose(b["adv"], (b["score"][:, None] - b["value_old"]) * m, atol=1e-5)
    assert torch.allclose(b["returns"], b["score"][:, None] * m, atol=1e-5)
    b["n_seqs"], b["n_tokens"] = len(m), float(m.sum())
    loss, st2 = PPO.loss(run, b)
    assert st2["clipfrac"] == 0 and abs(st2["approx_kl"]) < 1e-5
    assert abs(st["kl/ref"]) < 1e-5  # policy == reference at the start
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.policy.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.modules["value"].head.parameters())


def test_kl_in_reward_charges_the_kl(start):
    run = _run(start, PPOConfig(beta=1.0, lam=1.0, whiten_adv=False))
    run.ref = frozen_copy(load_policy("tiny", device="cpu")[0])  # a very different reference
    b, st = PPO.collect(run)
    m = b["completion_mask"]
    k1 = (b["logp_old"] - b["ref_logp"]) * m
    # lambda = 1, gamma = 1: return at the first token = score - beta * sum_t k1
    assert torch.allclose(b["returns"][:, 0], b["score"] - k1.sum(-1), atol=1e-4)
    assert st["kl/seq"] > 1


def test_ppo_through_train_task_reward(start, tmp_path):
    cfg = PPO.config(model=start, steps=4, batch_size=16, minibatch_size=8, eval_every=0, eval_n=20,
                     out=str(tmp_path / "ppo"), progress=False, device="cpu")
    train(cfg, PPO)
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert all(r["clipfrac"] < 0.5 and r["approx_kl"] < 0.1 for r in rows[:-1])
    assert rows[1]["kl/seq"] != 0 or rows[2]["kl/seq"] != 0  # the policy moved away from the reference


def test_ppo_with_reward_model_and_critic_from_rm(start, tmp_path):
    from rlbook.reward_model import REWARD_MODEL, RMConfig
    rcfg = REWARD_MODEL.config(model=start, steps=2, batch_size=16, eval_every=0, out=str(tmp_path / "rm"),
                               progress=False, device="cpu")
    o = RMConfig(eval_pairs=20)
    train(rcfg, REWARD_MODEL, options=o)
    opts = PPOConfig(reward_model=f"{tmp_path / 'rm'},{tmp_path / 'rm'}", ensemble="min", critic_init="reward",
                     missing_eos_penalty=1.0, whiten_rewards=True, kl_in_reward=False, gold="mean_digit")
    cfg = PPO.config(model=start, steps=2, batch_size=16, minibatch_size=16, epochs=1, eval_every=0, eval_n=20,
                     out=str(tmp_path / "ppo-rm"), progress=False, device="cpu")
    rm_before = [p.clone() for p in build_run(cfg, PPO, options=opts).modules["rms"].parameters()]
    run = train(cfg, PPO, options=opts)
    rows = read_metrics(tmp_path / "ppo-rm" / "metrics.jsonl")
    assert "proxy/mean" in rows[0] and "gold/mean" in rows[0]
    assert all(torch.equal(a, b) for a, b in zip(rm_before, run.modules["rms"].parameters()))  # the RM is frozen


def test_setup_is_deterministic_in_the_seed(start):
    cfg = PPO.config(model=start, device="cpu")
    a = build_run(cfg, PPO, options=PPOConfig()).modules["value"].head.weight.clone()
    torch.randn(1000)  # consume the global random stream
    b = build_run(cfg, PPO, options=PPOConfig()).modules["value"].head.weight
    assert torch.equal(a, b)
