"""Exact-toy tests of rlbook.objective and the solutions of its exercises."""
import math

import torch

from rlbook.objective import (categorical_kl, exact_policy_gradient, kl_regularised_objective, log_partition,
                              optimal_policy, policy_gradient_ascent)


def toy(seed=0, n=4, K=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g, dtype=torch.float64), torch.rand(n, K, generator=g, dtype=torch.float64)


# --- solutions of the exercises -------------------------------------------------------------
def optimal_value(ref_logits, reward, beta):
    "max_pi J_beta = beta log sum_y pi_ref(y) exp(r(y)/beta), written out."
    return beta * torch.logsumexp(ref_logits.log_softmax(-1) + reward / beta, -1)


def beta_for_kl(ref_logits, reward, target_kl, iters=200):
    "Bisection on log beta: KL(pi*_beta || pi_ref) decreases in beta."
    lo, hi = math.log(1e-6), math.log(1e6)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        kl = categorical_kl(optimal_policy(ref_logits, reward, math.exp(mid)), ref_logits).item()
        lo, hi = (mid, hi) if kl > target_kl else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def test_exercise_optimal_value():
    ref, r = toy(1, 3, 7)
    assert torch.allclose(optimal_value(ref, r, 0.25), 0.25 * log_partition(ref, r, 0.25))
    # and it is the value of J at pi*, which no random policy beats
    assert torch.allclose(kl_regularised_objective(optimal_policy(ref, r, 0.25), r, ref, 0.25), optimal_value(ref, r, 0.25))
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        th = 3 * torch.randn(3, 7, generator=g, dtype=torch.float64)
        assert (kl_regularised_objective(th, r, ref, 0.25) <= optimal_value(ref, r, 0.25) + 1e-12).all()


def test_exercise_beta_for_kl():
    g = torch.Generator().manual_seed(2)
    ref, r = torch.randn(10, generator=g, dtype=torch.float64), torch.rand(10, generator=g, dtype=torch.float64)
    for target in (0.01, 0.1, 0.5):
        b = beta_for_kl(ref, r, target)
        assert abs(categorical_kl(optimal_policy(ref, r, b), ref).item() - target) < 1e-6


# --- the chapter's claims ---------------------------------------------------------------------
def test_gradient_ascent_converges_to_optimal_policy():
    ref, r = toy()
    for beta in (1.0, 0.3, 0.1):
        theta, hist = policy_gradient_ascent(r, ref, beta, lr=5.0 / beta, steps=2000)
        assert categorical_kl(theta, optimal_policy(ref, r, beta)).max() < 1e-4
        assert hist[-1]["objective"] > hist[0]["objective"]
        # the objective never decreases along the way
        objs = [h["objective"] for h in hist]
        assert all(b >= a - 1e-12 for a, b in zip(objs, objs[1:]))


def test_optimal_policy_maximises_objective_against_perturbations():
    ref, r = toy(3)
    opt = optimal_policy(ref, r, 0.2)
    best = kl_regularised_objective(opt, r, ref, 0.2)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        worse = kl_regularised_objective(opt + 0.1 * torch.randn(opt.shape, generator=g, dtype=torch.float64), r, ref, 0.2)
        assert (worse <= best + 1e-12).all()
    assert exact_policy_gradient(opt, r, ref, 0.2).abs().max() < 1e-12


def test_beta_to_zero_collapses_to_point_mass():
    ref, r = toy(4)
    ents = []
    for beta in (1.0, 0.1, 0.01, 0.001):
        p = optimal_policy(ref, r, beta).exp()
        ents.append(-(p * p.clamp_min(1e-300).log()).sum(-1).mean().item())
    assert all(b < a for a, b in zip(ents, ents[1:]))
    p0 = optimal_policy(ref, r, 0.0).exp()
    assert torch.equal(p0.argmax(-1), r.argmax(-1)) and torch.allclose(p0.max(-1).values, torch.ones(4, dtype=torch.float64))
    _, hist = policy_gradient_ascent(r, ref, 0.0, lr=5.0, steps=2000)
    assert hist[-1]["entropy"] < 0.2 * hist[0]["entropy"]


def test_exact_gradient_matches_autograd():
    ref, r = toy(6, 2, 5)
    th = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for beta in (0.0, 0.5, 2.0):
        auto, = torch.autograd.grad(kl_regularised_objective(th, r, ref, beta).sum(), th)
        assert torch.allclose(exact_policy_gradient(th.detach(), r, ref, beta), auto)
