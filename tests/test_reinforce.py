"""Tests of rlbook.reinforce: Monte-Carlo unbiasedness and variance ordering on the exact toy, advantage
functions against naive loops, the loss against the estimator, the LM methods, CartPole, exercise solutions."""
import math

import pytest
import torch

from rlbook.objective import exact_policy_gradient
from rlbook.reinforce import (PGConfig, REINFORCE, REINFORCE_PP, REMAX, RLOO, batch_mean_baseline,
                              cartpole_reinforce, discounted_returns, exact_estimator_variance, kl_penalised_reward,
                              leave_one_out_baseline, masked_whiten, optimal_baseline, pg_loss, reinforce_advantages,
                              reinforce_estimates, reinforce_pp_advantages, remax_advantages, rloo_advantages,
                              score_function)
from rlbook.logprobs import seq_sum, token_mean


def toy(seed=0, K=8, M=40000, N=4):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=torch.float64)
    reward = 1.0 + torch.rand(K, generator=g, dtype=torch.float64)
    actions = torch.multinomial(theta.softmax(-1).expand(M, K), N, replacement=True, generator=g)
    return theta, reward, actions


# --- solutions of the exercises -------------------------------------------------------------
def rloo_from_mean(reward, group_size):
    r = reward.view(-1, group_size)
    return (group_size / (group_size - 1) * (r - r.mean(-1, keepdim=True))).reshape(-1)


def loo_optimal_baseline(logits, reward, actions):
    sq = (score_function(logits, actions) ** 2).sum(-1)  # (M, N) |s_j|^2
    w, wr = sq, sq * reward[actions]
    return (wr.sum(-1, keepdim=True) - wr) / (w.sum(-1, keepdim=True) - w)


def group_normalised_advantages(reward, group_size, eps=1e-6):
    r = reward.view(-1, group_size)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)).reshape(-1)


def test_exercise_rloo_from_mean():
    rr = torch.rand(24, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(rloo_from_mean(rr, 6), rloo_advantages(rr, 6), atol=1e-6)


def confident_toy(seed=0, N=8, M=20000):
    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor([3.0] + [0.0] * 7, dtype=torch.float64)
    reward = torch.tensor([1.0] + [2.0] * 7, dtype=torch.float64) + 0.1 * torch.rand(8, generator=g, dtype=torch.float64)
    return theta, reward, torch.multinomial(theta.softmax(-1).expand(M, 8), N, replacement=True, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exercise_loo_optimal_baseline(seed):
    theta, reward, actions = confident_toy(seed)
    exact = exact_policy_gradient(theta, reward, theta, 0.0)
    e = reinforce_estimates(theta, reward, actions, loo_optimal_baseline(theta, reward, actions)).mean(-2)
    z = (e.mean(0) - exact) / (e.std(0) / len(e) ** 0.5)
    assert z.abs().max() < 4.5
    e_loo = reinforce_estimates(theta, reward, actions, leave_one_out_baseline(reward[actions])).mean(-2)
    var = lambda x: ((x - x.mean(0)) ** 2).sum(-1).mean().item()
    assert var(e) < 0.8 * var(e_loo)


def test_optimal_baseline_far_from_mean_on_confident_policy():
    theta, reward, _ = confident_toy(0)
    er = (theta.softmax(-1) * reward).sum()
    bs = optimal_baseline(theta, reward)
    assert bs > er + 0.4
    assert exact_estimator_variance(theta, reward, bs) < 0.1 * exact_estimator_variance(theta, reward, er)


def test_exercise_group_normalised_advantages():
    rr = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    ga = group_normalised_advantages(rr, 3)
    assert torch.allclose(ga[:3], (rr[:3] - rr[:3].mean()) / (rr[:3].std() + 1e-6))
    assert torch.allclose(ga[3:], torch.zeros(3))


# --- the exact toy ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monte_carlo_gradient_is_unbiased(seed):
    theta, reward, actions = toy(seed)
    N = actions.shape[1]
    exact = exact_policy_gradient(theta, reward, theta, 0.0)
    ra = reward[actions]
    for name, b, scale in (("none", 0.0, 1.0), ("loo", leave_one_out_baseline(ra), 1.0),
                           ("b*", optimal_baseline(theta, reward), 1.0),
                           ("mean", batch_mean_baseline(ra), (N - 1) / N)):
        e = reinforce_estimates(theta, reward, actions, b).mean(-2)  # (M, K)
        z = (e.mean(0) - scale * exact) / (e.std(0) / len(e) ** 0.5)
        assert z.abs().max() < 4.5, (name, z)
    # the test has power: the batch-mean estimator is detectably biased against the unshrunk gradient
    e = reinforce_estimates(theta, reward, actions, batch_mean_baseline(ra)).mean(-2)
    z = (e.mean(0) - exact) / (e.std(0) / len(e) ** 0.5)
    assert z.abs().max() > 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_ordering_of_baselines(seed):
    theta, reward, actions = toy(seed)
    N = actions.shape[1]
    ra = reward[actions]
    var = {}
    for name, b in (("none", 0.0), ("loo", leave_one_out_baseline(ra)), ("mean", batch_mean_baseline(ra)),
                    ("Er", (theta.softmax(-1) * reward).sum()), ("b*", optimal_baseline(theta, reward))):
        e = reinforce_estimates(theta, reward, actions, b).mean(-2)
        var[name] = ((e - e.mean(0)) ** 2).sum(-1).mean().item()
    assert var["none"] > 10 * var["loo"]
    assert var["loo"] > var["Er"] >= 0.98 * var["b*"]
    assert math.isclose(var["mean"], var["loo"] * ((N - 1) / N) ** 2, rel_tol=1e-9)
    # Monte-Carlo agrees with the exact formula for the constant baselines
    for name in ("none", "Er", "b*"):
        b = {"none": 0.0, "Er": (theta.softmax(-1) * reward).sum(), "b*": optimal_baseline(theta, reward)}[name]
        assert math.isclose(var[name], exact_estimator_variance(theta, reward, b).item() / N, rel_tol=0.05)
    # b* is the exact minimiser over constants
    bs = optimal_baseline(theta, reward)
    for b in torch.linspace(0, 3, 61, dtype=torch.float64):
        assert exact_estimator_variance(theta, reward, bs) <= exact_estimator_variance(theta, reward, b) + 1e-12


def test_pg_loss_gradient_is_the_reinforce_estimate():
    theta, reward, actions = toy(0, M=1)
    a = actions[0]  # N samples
    th = theta.clone().requires_grad_(True)
    logp = th.log_softmax(-1)[a][:, None]  # (N, 1) one-token "completions"
    adv = reward[a] - 1.5
    loss, _ = pg_loss(logp, adv, torch.ones(len(a), 1))
    grad, = torch.autograd.grad(loss, th)
    assert torch.allclose(-grad, reinforce_estimates(theta, reward, a, 1.5).mean(0))


def test_pg_loss_accumulation_invariance():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 4, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    for agg in (seq_sum, token_mean):
        full = pg_loss(logp, adv, mask, aggregation=agg)[0]
        parts = sum(pg_loss(logp[i:i + 2], adv[i:i + 2], mask[i:i + 2], aggregation=agg, n_seqs=6,
                            n_tokens=float(mask.sum()))[0] for i in (0, 2, 4))
        assert torch.isclose(full, parts)


# --- advantage functions against naive loops ---------------------------------------------------
def test_advantages_against_loops():
    g = torch.Generator().manual_seed(0)
    G, P = 4, 3
    r = torch.rand(G * P, generator=g)
    greedy = torch.rand(P, generator=g)
    rloo, remax = rloo_advantages(r, G), remax_advantages(r, greedy, G)
    for p in range(P):
        for i in range(G):
            k = p * G + i
            others = [r[p * G + j] for j in range(G) if j != i]
            assert math.isclose(rloo[k].item(), (r[k] - sum(others) / (G - 1)).item(), abs_tol=1e-6)
            assert math.isclose(remax[k].item(), (r[k] - greedy[p]).item(), abs_tol=1e-6)
    assert torch.equal(reinforce_advantages(r), r)
    with pytest.raises(ValueError):
        rloo_advantages(r, 1)


def test_reinforce_pp_against_loop():
    g = torch.Generator().manual_seed(1)
    B, T = 5, 6
    reward, kl = torch.rand(B, generator=g), torch.randn(B, T, generator=g)
    lens = [6, 3, 1, 0, 4]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lens])
    beta, gamma = 0.1, 0.9
    got = reinforce_pp_advantages(reward, kl, mask, beta=beta, gamma=gamma)
    want = torch.zeros(B, T)
    for i in range(B):
        L = lens[i]
        tr = [-beta * kl[i, t].item() + (reward[i].item() if t == L - 1 else 0.0) for t in range(L)]
        for t in range(L):
            want[i, t] = sum(gamma ** (k - t) * tr[k] for k in range(t, L))
    assert torch.allclose(got, want, atol=1e-6)
    w = masked_whiten(got, mask)
    vals = w[mask.bool()]
    assert abs(vals.mean().item()) < 1e-6 and abs(vals.std().item() - 1) < 1e-5
    assert torch.all(w[~mask.bool()] == 0)
    # beta = 0, gamma = 1: every token of a sequence carries the sequence reward
    plain = reinforce_pp_advantages(reward, kl, mask, beta=0.0)
    assert torch.allclose(plain, reward[:, None] * mask)
    assert torch.allclose(kl_penalised_reward(reward, kl, mask, beta), reward - beta * (kl * mask).sum(-1))


def test_discounted_returns_loop():
    g = torch.Generator().manual_seed(2)
    r = torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    got = discounted_returns(r, mask, 0.7)
    for i in range(3):
        L = int(mask[i].sum())
        for t in range(5):
            want = sum(0.7 ** (k - t) * r[i, k].item() for k in range(t, L)) if t < L else 0.0
            assert math.isclose(got[i, t].item(), want, abs_tol=1e-6)


# --- the methods on the tiny model, and CartPole ------------------------------------------------
def test_methods_run_and_are_on_policy(tmp_path):
    from rlbook.sft import warm_start
    from rlbook.train import read_metrics, train
    warm = str(warm_start(progress=False))
    for m in (REINFORCE, RLOO, REMAX, REINFORCE_PP):
        assert isinstance(m.options, PGConfig)
        cfg = m.config(model=warm, steps=2, batch_size=8, group_size=4, eval_n=8, out=str(tmp_path / m.name),
                       progress=False, device="cpu")
        train(cfg, m)
        rows = read_metrics(tmp_path / m.name / "metrics.jsonl")
        assert abs(rows[0]["kl/ref"]) < 1e-5 and all(math.isfinite(r["loss"]) for r in rows[:-1])
        if m is RLOO:
            assert abs(rows[0]["adv/mean"]) < 1e-6  # leave-one-out advantages sum to zero per group
        if m is REMAX:
            assert "remax/greedy_reward" in rows[0]
        if m is REINFORCE_PP:
            assert abs(rows[0]["adv/mean"]) < 1e-5  # whitened


def test_cartpole_learns_with_value_baseline():
    log = cartpole_reinforce(updates=25, episodes_per_update=8, baseline=True, seed=0)
    first = sum(r["return/mean"] for r in log[:3]) / 3
    last = sum(r["return/mean"] for r in log[-5:]) / 5
    assert last > 100 and last > 3 * first
