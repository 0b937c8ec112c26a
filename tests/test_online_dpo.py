"""Tests of the online DPO chapter (rlbook.online_dpo): the XPO and HyPO terms, pair labelling, reference sync,
the Methods in the loop, and the exercise solutions."""
import math

import pytest
import torch

from rlbook.dpo import dpo_loss, fit_population
from rlbook.models import RLBookError
from rlbook.objective import categorical_kl, optimal_policy
from rlbook.online_dpo import (HYPO, ONLINE_DPO, SPIN, XPO, OnlineDPOConfig, label_rollout_pairs, online_kl_loss,
                               sync_reference, xpo_bonus_loss)
from rlbook.preference_data import TaskGold
from rlbook.tasks import BradleyTerryOracle, Example, get_task
from rlbook.train import read_metrics, train

torch.set_num_threads(1)


# ---------------------------------------------------------------- exercise solutions
def iterative_dpo_policy(ref_logits, reward, beta, t):
    "Solution: t exact rounds compound the tilt: log_softmax(log pi_ref + t r / beta)."
    return optimal_policy(ref_logits, t * reward, beta)


def best_of_n_kl_bound(n):
    "Solution: log n - (n - 1) / n."
    return math.log(n) - (n - 1) / n


def test_iterative_dpo_solution():
    g = torch.Generator().manual_seed(3)
    ref0, rew0 = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    mu0 = torch.full((2, 4), 0.25, dtype=torch.float64)
    cur = ref0
    for _ in range(3):
        cur = fit_population(dpo_loss, cur, rew0, mu0, beta=1.0)
    assert torch.allclose(iterative_dpo_policy(ref0, rew0, 1.0, 3), cur.log_softmax(-1), atol=1e-4)


def test_best_of_n_bound_solution():
    K = 4000
    Fk = torch.arange(K + 1, dtype=torch.float64) / K
    for n in (1, 2, 4, 16):
        p = Fk[1:] ** n - Fk[:-1] ** n
        exact = (p * torch.log(p * K)).sum().item()
        assert exact <= best_of_n_kl_bound(n) + 1e-9 and abs(exact - best_of_n_kl_bound(n)) < 5e-3


# ---------------------------------------------------------------- the two extra terms
def test_xpo_bonus_naive_and_gradient():
    x = torch.tensor([-1.0, -2.5, -0.3], dtype=torch.float64, requires_grad=True)
    loss, st = xpo_bonus_loss(x, alpha=0.2, n_pairs=6)
    assert loss.item() == pytest.approx(0.2 * (-1.0 - 2.5 - 0.3) / 6)
    loss.backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.2 / 6, dtype=torch.float64))
    assert st["xpo/reference_sample_logp"] == pytest.approx(-3.8 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_kl_expected_gradient_is_kl_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    K = 6
    theta, ref = torch.randn(K, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)
    th = theta.clone().requires_grad_()
    logp = th.log_softmax(-1)
    pi = logp.exp().detach()
    sur = sum(pi[y] * online_kl_loss(logp[y:y + 1], ref.log_softmax(-1)[y:y + 1], coef=0.7)[0] for y in range(K))
    g_sur = torch.autograd.grad(sur, th)[0]
    th2 = theta.clone().requires_grad_()
    g_kl = torch.autograd.grad(0.7 * categorical_kl(th2, ref), th2)[0]
    assert torch.allclose(g_sur, g_kl, atol=1e-12)


def test_online_kl_monte_carlo_unbiased():
    g = torch.Generator().manual_seed(5)
    K = 5
    theta, ref = torch.randn(K, generator=g), torch.randn(K, generator=g)
    th = theta.clone().requires_grad_()
    logp = th.log_softmax(-1)
    ys = torch.multinomial(logp.exp().detach(), 200_000, replacement=True, generator=g)
    loss = online_kl_loss(logp[ys], ref.log_softmax(-1)[ys], coef=1.0)[0]
    g_mc = torch.autograd.grad(loss, th)[0]
    th2 = theta.clone().requires_grad_()
    g_kl = torch.autograd.grad(categorical_kl(th2, ref), th2)[0]
    assert torch.allclose(g_mc, g_kl, atol=0.02)


# ---------------------------------------------------------------- labelling and sync
def test_label_rollout_pairs():
    exs = [Example("1+1=", "2", "2")] * 2 + [Example("3+4=", "7", "7")] * 2
    oracle = BradleyTerryOracle(reward_fn=TaskGold(get_task("addition")), beta=0.001)
    recs, st = label_rollout_pairs(exs, ["5", "2", "7", "8"], oracle, torch.Generator().manual_seed(0))
    assert [(r["chosen"], r["rejected"]) for r in recs] == [("2", "5"), ("7", "8")]
    assert st["pairs/identical_frac"] == 0.0 and recs[0]["gold_chosen"] == 1.0
    with pytest.raises(RLBookError):
        label_rollout_pairs(exs[:3], ["1", "2", "3"], oracle, None)


def test_identical_pair_has_zero_gradient():
    c = torch.tensor([-1.2, -0.4], requires_grad=True)
    dpo_loss(c, c, torch.tensor([-1.0, -1.0]), torch.tensor([-1.0, -1.0]), beta=0.5)[0].backward()
    assert torch.all(c.grad == 0)


class _R:  # minimal run for sync_reference
    def __init__(self, step):
        self.step, self.model, self.ref = step, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)


def test_sync_reference():
    r = _R(0)
    assert not sync_reference(r, 5)  # never at step 0
    r.step = 5
    assert sync_reference(r, 5) and torch.equal(r.ref.weight, r.model.weight)
    r.step = 7
    assert not sync_reference(r, 5) and not sync_reference(r, 0)


# ---------------------------------------------------------------- Methods in the loop
@pytest.fixture(scope="module")
def sft_path():
    from rlbook.sft import warm_start
    return str(warm_start(progress=False))


@pytest.mark.parametrize("M", [ONLINE_DPO, XPO, SPIN, HYPO], ids=lambda m: m.name)
def test_methods_run(M, sft_path, tmp_path):
    bs = 8 if M.defaults["group_size"] == 1 else 16
    cfg = M.config(model=sft_path, steps=3, batch_size=bs, eval_n=10, out=str(tmp_path), progress=False, device="cpu")
    o = OnlineDPOConfig(**{**M.options.__dict__, "n_pairs": 24, "ref_sync_every": 2 if M is SPIN else M.options.ref_sync_every})
    train(cfg, M, options=o)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    if M in (ONLINE_DPO, SPIN):
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    if M is SPIN:
        assert [r["ref/synced"] for r in rows] == [0.0, 0.0, 1.0]
    if M is XPO:
        assert "xpo/reference_sample_logp" in rows[0]
    if M is HYPO:
        assert rows[0]["kl/seq"] == pytest.approx(0.0, abs=1e-4)


def test_online_dpo_needs_pairs(sft_path, tmp_path):
    cfg = ONLINE_DPO.config(model=sft_path, steps=1, batch_size=8, group_size=1, eval_n=10, out=str(tmp_path), progress=False, device="cpu")
    o = OnlineDPOConfig()
    with pytest.raises(RLBookError, match="group_size=2"):
        train(cfg, ONLINE_DPO, options=o)


def test_resume_after_a_reference_refresh_is_exact(sft_path, tmp_path):
    "SPIN, ref_sync_every=2: stop after step 2 (the reference was refreshed at step 2), resume to 5 steps, compare."
    M = SPIN
    bs = 8 if M.defaults["group_size"] == 1 else 16
    o = OnlineDPOConfig(**{**M.options.__dict__, "ref_sync_every": 2})

    def run(out, steps, resume):
        cfg = M.config(model=sft_path, steps=steps, batch_size=bs, lr=1e-3, eval_n=10, eval_every=0, out=str(out),
                       progress=False, device="cpu", resume=resume, save_every=1)
        return train(cfg, M, options=o)
    whole = run(tmp_path / "whole", 5, False)
    run(tmp_path / "cut", 3, False)  # steps 0-2; the reference was refreshed at the start of step 2
    resumed = run(tmp_path / "cut", 5, True)
    assert resumed.ref_step == whole.ref_step == 4
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    assert strip(read_metrics(tmp_path / "whole" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "cut" / "metrics.jsonl"))
    for a, b in [(whole.model, resumed.model), (whole.ref, resumed.ref)]:
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
