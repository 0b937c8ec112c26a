"""Tests of the PPO chapter (rlbook.ppo): GAE against a naive recursive transcription, the clipped surrogate's
value and gradient, the value loss, token-level rewards, a short CartPole run, and the exercise solutions."""
import math

import pytest
import torch

from rlbook.logprobs import last_token_mask, masked_whiten
from rlbook.ppo import (ActorCritic, cartpole_ppo, gae_advantages, mdpo_policy_loss, ppo_policy_loss, td_errors,
                        token_rewards, value_loss)

torch.set_num_threads(1)


# ---------------------------------------------------------------- exercise solutions
def n_step_advantage(reward, value, n, gamma):
    "Solution: sum_{l<n} gamma^l r_{t+l} + gamma^n V(s_{t+n}) - V(s_t) (zero past the end)."
    B, T = reward.shape
    r = torch.cat([reward, torch.zeros(B, n)], 1)
    v = torch.cat([value, torch.zeros(B, n)], 1)
    out = -value.clone()
    for l in range(n):
        out = out + gamma ** l * r[:, l: l + T]
    return out + gamma ** n * v[:, n: n + T]


def clip_grad_weight(ratio, adv, clip_eps):
    "Solution: rho * A unless the clip removed the token's gradient."
    clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
    return torch.where(clipped, torch.zeros_like(ratio), ratio * adv)


def test_n_step_solution():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    assert torch.allclose(n_step_advantage(r, v, 1, 0.9), td_errors(r, v, gamma=0.9))
    assert torch.allclose(n_step_advantage(r, v, 6, 0.9), gae_advantages(r, v, gamma=0.9, lam=1.0)[0], atol=1e-5)


def test_clip_grad_weight_solution():
    rho = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 1.5, 1.3])
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0, 1.0, -1.0, -1.0, 0.5])
    lp = rho.log().requires_grad_(True)
    loss, _ = ppo_policy_loss(lp[None], torch.zeros(1, 8), adv[None], torch.ones(1, 8),
                              aggregate=lambda x, m, **k: (x * m).sum())
    (-loss).backward()
    assert torch.allclose(clip_grad_weight(rho, adv, 0.2), lp.grad)


# ---------------------------------------------------------------- GAE
def naive_gae_recursive(r, v, d, n_real, gamma, lam, last):
    "Recursive definition, one row and one step at a time, in plain Python floats."
    out = []
    for i in range(len(r)):
        n = n_real[i]
        row = [0.0] * len(r[i])

        def A(t):
            if t >= n:
                return 0.0
            end = d[i][t] or (t == n - 1 and last is None)
            nv = 0.0 if end else (v[i][t + 1] if t + 1 < n else last[i])
            delta = r[i][t] + gamma * nv - v[i][t]
            return delta + (0.0 if end else gamma * lam * A(t + 1))

        for t in range(n):
            row[t] = A(t)
        out.append(row)
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
def test_gae_matches_naive_recursion_with_dones_and_masks(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 7
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    d = (torch.rand(B, T, generator=g) < 0.2).long()
    n_real = [7, 5, 1, 3]
    m = torch.tensor([[1] * n + [0] * (T - n) for n in n_real])
    d = d * m
    adv, ret = gae_advantages(r, v, gamma=gamma, lam=lam, done=d, mask=m)
    want = torch.tensor(naive_gae_recursive(r.tolist(), v.tolist(), d.tolist(), n_real, gamma, lam, None))
    assert torch.allclose(adv, want, atol=1e-5)
    assert torch.allclose(ret, (adv + v) * m, atol=1e-6)
    assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()


def test_gae_bootstrap_only_for_full_rows():
    r, v = torch.zeros(2, 3), torch.zeros(2, 3)
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, _ = gae_advantages(r, v, gamma=1.0, lam=1.0, mask=m, last_value=torch.tensor([2.0, 5.0]))
    assert torch.allclose(adv[0], torch.tensor([2.0, 2.0, 2.0]))  # bootstraps from last_value
    assert torch.allclose(adv[1], torch.zeros(3))  # ended inside the window: terminal, no bootstrap


def test_gae_gradient_free():
    v = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae_advantages(torch.randn(2, 3), v)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- token-level MDP
def test_token_rewards_land_on_last_real_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert last_token_mask(mask).argmax(-1).tolist() == [1, 3, 0]
    lp, ref = torch.randn(3, 4), torch.randn(3, 4)
    r = token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask, kl=lp - ref, beta=0.5)
    assert torch.allclose(r.sum(-1), torch.tensor([1.0, 2.0, 3.0]) - 0.5 * ((lp - ref) * mask).sum(-1))
    assert (r[mask == 0] == 0).all()


def test_masked_whiten():
    x = torch.randn(3, 5)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0] * 5])
    w = masked_whiten(x, m)
    assert abs(w[m.bool()].mean()) < 1e-5 and abs(w[m.bool()].std() - 1) < 1e-4
    assert (w[~m.bool()] == 0).all()


# ---------------------------------------------------------------- PPO losses
def test_ppo_equals_ratio_weighted_pg_when_nothing_clipped():
    g = torch.Generator().manual_seed(2)
    old = torch.randn(4, 6, generator=g).log_softmax(-1)
    lp = (old + 0.05 * torch.randn(4, 6, generator=g)).requires_grad_(True)
    adv = torch.randn(4, 6, generator=g)
    m = (torch.rand(4, 6, generator=g) < 0.8).float()
    loss, st = ppo_policy_loss(lp, old, adv, m, clip_eps=0.2)
    assert st["clipfrac"] == 0
    pg = -(torch.exp(lp - old) * adv * m).sum() / m.sum()
    assert torch.allclose(loss, pg)
    g1, = torch.autograd.grad(loss, lp)
    g2, = torch.autograd.grad(pg, lp)
    assert torch.allclose(g1, g2)


def test_ppo_ratio_one_gives_reinforce_gradient():
    old = torch.randn(3, 4).log_softmax(-1)
    lp = old.clone().requires_grad_(True)
    adv = torch.randn(3, 4)
    loss, st = ppo_policy_loss(lp, old, adv, torch.ones(3, 4))
    loss.backward()
    assert torch.allclose(lp.grad, -adv / 12) and abs(st["ratio/mean"] - 1) < 1e-6 and abs(st["approx_kl"]) < 1e-7


@pytest.mark.parametrize("log_ratio,adv,vanishes", [
    (0.5, 1.0, True),     # rho > 1 + eps, A > 0: gained enough, no gradient
    (-0.5, -1.0, True),   # rho < 1 - eps, A < 0: lost enough, no gradient
    (0.5, -1.0, False),   # rho > 1 + eps, A < 0: made it worse, always corrected
    (-0.5, 1.0, False),   # rho < 1 - eps, A > 0: made it worse, always corrected
    (0.1, 1.0, False),    # inside the trust region
])
def test_ppo_gradient_vanishes_only_in_the_right_direction(log_ratio, adv, vanishes):
    lp = torch.tensor([[log_ratio]], requires_grad=True)
    loss, st = ppo_policy_loss(lp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), clip_eps=0.2)
    loss.backward()
    if vanishes:
        assert lp.grad.item() == 0 and st["clipfrac"] == 1
    else:
        assert abs(lp.grad.item() + math.exp(log_ratio) * adv) < 1e-6 and st["clipfrac"] == 0
        # descent moves log pi in the direction of the advantage
        assert -lp.grad.item() * adv > 0


def test_dual_clip_bounds_negative_advantages():
    lp = torch.tensor([[math.log(5.0), math.log(5.0)]], requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0]])
    loss, _ = ppo_policy_loss(lp, torch.zeros(1, 2), adv, torch.ones(1, 2), dual_clip=3.0,
                              aggregate=lambda x, m, **k: (x * m).sum())
    assert abs(loss.item() - (3.0 - 1.2)) < 1e-5  # -(max(-5, -3)) - 1.2
    loss.backward()
    assert torch.all(lp.grad == 0)
    with pytest.raises(ValueError):
        ppo_policy_loss(lp, torch.zeros(1, 2), adv, torch.ones(1, 2), dual_clip=0.5)


def test_mdpo_kl_term_is_exact_kl_in_expectation():
    g = torch.Generator().manual_seed(3)
    p_old = torch.randn(5, generator=g).softmax(-1)
    theta = torch.randn(5, generator=g)
    p = theta.softmax(-1)
    exact_kl = (p * (p / p_old).log()).sum()
    # exact expectation over pi_old of the per-token loss with A = 0 equals kl_coef * KL(pi || pi_old)
    lp = p.log()[None].expand(1, 5)
    per = torch.stack([mdpo_policy_loss(lp[:, k:k + 1], p_old.log()[None, k:k + 1], torch.zeros(1, 1),
                                        torch.ones(1, 1), kl_coef=2.0)[0] for k in range(5)])
    assert torch.allclose((p_old * per).sum(), 2.0 * exact_kl, atol=1e-5)


def test_value_loss_clipping():
    v_old, R = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])
    v = torch.tensor([[0.5, 0.5]], requires_grad=True)
    loss, st = value_loss(v, v_old, R, torch.ones(1, 2), clip_eps=0.2)
    loss.backward()
    # token 0 moved toward its target past the clip: max picks the clipped error, gradient 0
    assert v.grad[0, 0] == 0 and v.grad[0, 1] > 0 and st["vf_clipfrac"] == 0.5
    l0, _ = value_loss(v, v_old, R, torch.ones(1, 2))
    assert torch.allclose(l0, 0.5 * ((v - R) ** 2).mean())


# ---------------------------------------------------------------- behaviour
def test_actor_critic_shapes_and_near_uniform_start():
    ac = ActorCritic(4, 2)
    lp, v = ac(torch.randn(7, 4))
    assert lp.shape == (7, 2) and v.shape == (7,)
    assert (lp.exp() - 0.5).abs().max() < 0.05


def test_cartpole_ppo_learns():
    log = cartpole_ppo(total_steps=4 * 128 * 40, seed=0)
    early = [r["return/mean"] for r in log[:3]]
    late = [r["return/mean"] for r in log[-5:] if r["return/mean"] == r["return/mean"]]
    assert sum(late) / len(late) > 2 * sum(early) / len(early)
    assert max(r["approx_kl"] for r in log) < 0.1
