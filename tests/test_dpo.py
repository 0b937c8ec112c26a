"""Tests of the DPO chapter (rlbook.dpo): exact optima on a categorical toy, every loss against a naive loop and
against its value at policy = reference, refused options and pairs files, exact resumption, and the exercise solutions
(the preference data themselves: tests/test_preference_data.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlbook.dpo import (CDPO, DPO, F_DIVERGENCES, FDPO, IPO, KTO, RDPO, RPO, SIMPO, DPOConfig, cdpo_loss, dpo_loss,
                        fdpo_loss, fit_population, ipo_loss, kto_loss, kto_reference_point, pair_margin,
                        population_pair_loss, rdpo_loss, rpo_loss, simpo_loss)
from rlbook.models import RLBookError
from rlbook.objective import optimal_policy
from rlbook.train import read_metrics, train

torch.set_num_threads(1)


# ---------------------------------------------------------------- exercise solutions
def dpo_pair_weight(h: torch.Tensor, beta: float) -> torch.Tensor:
    "Solution: the weight beta * sigmoid(-beta h) of @eq-dpo-grad."
    return beta * torch.sigmoid(-beta * h)


def optimal_margin(p: torch.Tensor, beta: float) -> torch.Tensor:
    "Solution: the margin h at DPO's optimum for preference probability p: sigmoid(beta h) = p."
    return torch.logit(p) / beta


def slic_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta=0.1, n_pairs=None):
    "Solution: the hinge (SLiC-HF) loss max(0, 1 - beta h)."
    h = pair_margin(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)
    per = F.relu(1 - beta * h)
    return per.sum() / (per.shape[0] if n_pairs is None else n_pairs), {}


def test_exercise_solutions():
    h = torch.randn(6, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(6, dtype=torch.float64)
    dpo_loss(h, z, z, z, beta=0.3)[0].backward()
    assert torch.allclose(dpo_pair_weight(h.detach(), 0.3) / 6, -h.grad)
    p = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(torch.sigmoid(0.5 * optimal_margin(p, 0.5)), p)
    c, r = torch.randn(4), torch.randn(4)
    assert math.isclose(slic_loss(c, r, c, r)[0].item(), 1.0)
    naive = sum(max(0.0, 1 - 0.5 * (c[i].item() - r[i].item())) for i in range(4)) / 4
    assert math.isclose(slic_loss(c, r, torch.zeros(4), torch.zeros(4), beta=0.5)[0].item(), naive, rel_tol=1e-6)


# ---------------------------------------------------------------- the losses
def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 2 for _ in range(4)]


def _sp(z):  # softplus(-z) = -log sigmoid(z), in floats
    return math.log1p(math.exp(-z)) if z > -30 else -z


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_pair_losses_against_naive_loops(beta):
    c, r, rc, rr = _batch()
    n = len(c)
    hs = [(c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item()) for i in range(n)]
    eps = 0.15
    expected = {
        "dpo": (dpo_loss, {}, sum(_sp(beta * h) for h in hs) / n),
        "ipo": (ipo_loss, {}, sum((h - 1 / (2 * beta)) ** 2 for h in hs) / n),
        "cdpo": (cdpo_loss, {"label_smoothing": eps}, sum((1 - eps) * _sp(beta * h) + eps * _sp(-beta * h) for h in hs) / n),
        "rdpo": (rdpo_loss, {"flip_rate": eps},
                 sum(((1 - eps) * _sp(beta * h) - eps * _sp(-beta * h)) / (1 - 2 * eps) for h in hs) / n),
    }
    for name, (fn, kw, want) in expected.items():
        assert math.isclose(fn(c, r, rc, rr, beta=beta, **kw)[0].item(), want, rel_tol=1e-10), name
    lc, lr = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([6, 5, 4, 3, 2, 1])
    want = sum(_sp(beta * c[i].item() / lc[i].item() - beta * r[i].item() / lr[i].item() - 0.7) for i in range(n)) / n
    assert math.isclose(simpo_loss(c, r, lc, lr, beta=beta, gamma=0.7)[0].item(), want, rel_tol=1e-10)
    want = sum(_sp(beta * h) for h in hs) / n + 0.4 * sum(-c[i].item() / lc[i].item() for i in range(n)) / n
    assert math.isclose(rpo_loss(c, r, rc, rr, lc, beta=beta, alpha=0.4)[0].item(), want, rel_tol=1e-10)
    fps = {"reverse_kl": lambda u: math.log(u) + 1, "forward_kl": lambda u: -1 / u,
           "js": lambda u: math.log(2 * u / (1 + u)), "alpha": lambda u: (1 - u ** -0.5) / 0.5}
    for name, fp in fps.items():
        want = sum(_sp(beta * (fp(math.exp(c[i].item() - rc[i].item())) - fp(math.exp(r[i].item() - rr[i].item()))))
                   for i in range(n)) / n
        assert math.isclose(fdpo_loss(c, r, rc, rr, beta=beta, f_prime=F_DIVERGENCES[name](0.5))[0].item(), want, rel_tol=1e-9), name


def test_kto_against_naive_loop():
    c, r, rc, rr = _batch(1)
    logp, ref = torch.cat([c, r]), torch.cat([rc, rr])
    des = torch.arange(12) < 6
    z0 = kto_reference_point(c + 1, rc)
    assert z0.item() == pytest.approx(max(0.0, (c + 1 - rc).mean().item()))
    want = 0.0
    for i in range(12):
        x = logp[i].item() - ref[i].item()
        want += (1.0 - 1.0 / (1 + math.exp(-0.2 * (x - z0.item())))) if des[i] else (2.0 - 2.0 / (1 + math.exp(-0.2 * (z0.item() - x))))
    assert math.isclose(kto_loss(logp, ref, des, z0, beta=0.2, lambda_d=1.0, lambda_u=2.0)[0].item(), want / 12, rel_tol=1e-10)


def test_hand_values_at_policy_equals_reference():
    c, r, _, _ = _batch(2)
    lc = torch.tensor([1, 2, 3, 1, 2, 3])
    for beta in (0.1, 1.0):
        for fn, kw in ((dpo_loss, {}), (cdpo_loss, {"label_smoothing": 0.3}), (rdpo_loss, {"flip_rate": 0.3})):
            assert fn(c, r, c, r, beta=beta, **kw)[0].item() == pytest.approx(math.log(2), abs=1e-12)
        for make in F_DIVERGENCES.values():
            assert fdpo_loss(c, r, c, r, beta=beta, f_prime=make(0.7))[0].item() == pytest.approx(math.log(2), abs=1e-12)
        assert ipo_loss(c, r, c, r, beta=beta)[0].item() == pytest.approx(1 / (4 * beta ** 2))
        assert rpo_loss(c, r, c, r, lc, beta=beta, alpha=0.5)[0].item() == pytest.approx(
            math.log(2) + 0.5 * (-(c / lc).mean().item()))
        des = torch.tensor([True, False] * 3)
        assert kto_loss(c, c, des, 0.0, beta=beta, lambda_d=1.0, lambda_u=3.0)[0].item() == pytest.approx((3 * 0.5 + 3 * 1.5) / 6)
    z = torch.zeros(6, dtype=torch.float64)
    assert simpo_loss(z, z, lc, lc, beta=2.0, gamma=1.0)[0].item() == pytest.approx(math.log1p(math.e))


def test_gradient_accumulation_invariance_and_weights():
    c, r, rc, rr = _batch(3)
    for fn in (dpo_loss, ipo_loss, cdpo_loss, rdpo_loss):
        full = fn(c, r, rc, rr, beta=0.3)[0]
        parts = fn(c[:2], r[:2], rc[:2], rr[:2], beta=0.3, n_pairs=6)[0] + fn(c[2:], r[2:], rc[2:], rr[2:], beta=0.3, n_pairs=6)[0]
        assert torch.isclose(full, parts)


def test_rdpo_is_unbiased_for_clean_dpo():
    c, r, rc, rr = _batch(4)
    for eps in (0.1, 0.3, 0.45):
        noisy = (1 - eps) * rdpo_loss(c, r, rc, rr, beta=0.7, flip_rate=eps)[0] + eps * rdpo_loss(r, c, rr, rc, beta=0.7, flip_rate=eps)[0]
        assert torch.isclose(noisy, dpo_loss(c, r, rc, rr, beta=0.7)[0])
    with pytest.raises(RLBookError):
        rdpo_loss(c, r, rc, rr, flip_rate=0.5)
    with pytest.raises(RLBookError):
        cdpo_loss(c, r, rc, rr, label_smoothing=0.6)



@pytest.mark.parametrize("eps,beta", [(0.2, 1.0), (0.3, 1.0), (0.4, 0.1)])
def test_dpo_and_rdpo_part_only_at_large_margins(eps, beta):
    "The mechanism the label-noise sweep relies on, per clear-cut pair (clean label: y_w wins), with labels flipped w.p. eps."
    def expected_grad(fn, h, **kw):  # d/dh of E_noise[loss]: the observed label is clean w.p. 1 - eps, swapped w.p. eps
        h = torch.tensor([float(h)], dtype=torch.float64, requires_grad=True)
        z = torch.zeros(1, dtype=torch.float64)
        loss = (1 - eps) * fn(h, z, z, z, beta=beta, **kw)[0] + eps * fn(z, h, z, z, beta=beta, **kw)[0]
        return torch.autograd.grad(loss, h)[0].item()
    # at h = 0 a single pair's rDPO gradient is DPO's times 1 / (1 - 2 eps), for either label: the same direction
    z = torch.zeros(1, dtype=torch.float64)
    for swapped in (False, True):
        grads = []
        for fn, kw in ((dpo_loss, {}), (rdpo_loss, {"flip_rate": eps})):
            h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            c, r = (z, h) if swapped else (h, z)
            grads.append(torch.autograd.grad(fn(c, r, z, z, beta=beta, **kw)[0], h)[0])
        assert torch.isclose(grads[1], grads[0] / (1 - 2 * eps))
    # under the noise, DPO's expected gradient vanishes where sigmoid(beta h) = 1 - eps: its margin stops there ...
    h_cap = math.log((1 - eps) / eps) / beta
    assert abs(expected_grad(dpo_loss, h_cap)) < 1e-12
    assert expected_grad(dpo_loss, 2 * h_cap) > 0  # ... and is pushed back beyond it
    # ... while rDPO's expected gradient is the clean DPO gradient -beta sigmoid(-beta h) everywhere: it keeps going
    for h in (0.0, h_cap, 2 * h_cap):
        assert math.isclose(expected_grad(rdpo_loss, h, flip_rate=eps), -beta / (1 + math.exp(beta * h)), rel_tol=1e-9)


# ---------------------------------------------------------------- exact optima on the categorical toy
def _toy(seed=0, M=3, K=5):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(M, K, generator=g, dtype=torch.float64)
    reward = torch.randn(M, K, generator=g, dtype=torch.float64)
    mu = torch.rand(M, K, generator=g, dtype=torch.float64) + 0.2
    return ref, reward, mu / mu.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed,beta", [(0, 0.5), (1, 1.0), (2, 0.2)])
def test_dpo_population_optimum_is_the_tilted_reference(seed, beta):
    ref, reward, mu = _toy(seed)
    theta = fit_population(dpo_loss, ref, reward, mu, beta=beta)
    assert (theta.log_softmax(-1) - optimal_policy(ref, reward, beta)).abs().max() < 1e-4


def test_rdpo_recovers_the_optimum_under_label_noise_and_dpo_does_not():
    ref, reward, mu = _toy(5)
    target = optimal_policy(ref, reward, 0.5)
    th_r = fit_population(rdpo_loss, ref, reward, mu, beta=0.5, label_noise=0.3, flip_rate=0.3)
    th_d = fit_population(dpo_loss, ref, reward, mu, beta=0.5, label_noise=0.3)
    assert (th_r.log_softmax(-1) - target).abs().max() < 1e-4
    assert (th_d.log_softmax(-1) - target).abs().max() > 1e-2
    # with two answers, DPO on noisy labels fits the noisy preference probability exactly (shrunk margin)
    ref2, reward2, mu2 = _toy(8, M=3, K=2)
    lp = fit_population(dpo_loss, ref2, reward2, mu2, beta=0.5, label_noise=0.3).log_softmax(-1)
    p_noisy = 0.3 + 0.4 * torch.sigmoid(reward2[:, 0] - reward2[:, 1])
    h = (lp[:, 0] - ref2.log_softmax(-1)[:, 0]) - (lp[:, 1] - ref2.log_softmax(-1)[:, 1])
    assert torch.allclose(torch.sigmoid(0.5 * h), p_noisy, atol=1e-6)


def test_ipo_population_optimum():
    "Azar et al.: pi*(y) proportional to pi_ref(y) exp(p(y > mu) / tau), tau = beta."
    ref, reward, mu = _toy(6)
    beta = 0.5
    theta = fit_population(ipo_loss, ref, reward, mu, beta=beta)
    P = torch.sigmoid(reward[:, :, None] - reward[:, None, :])  # (M, K, K) P(y > y')
    p_mu = (P * mu[:, None, :]).sum(-1)  # (M, K)
    resid = theta.log_softmax(-1) - ref.log_softmax(-1) - p_mu / beta
    assert (resid - resid.mean(-1, keepdim=True)).abs().max() < 1e-4


def test_population_loss_at_reference_is_log2_times_pair_mass():
    ref, reward, mu = _toy(7)
    L = population_pair_loss(dpo_loss, ref, ref, reward, mu, beta=0.3)[0]
    assert torch.isclose(L, math.log(2) * ((1 - (mu ** 2).sum(-1)) / 2).mean())


# ---------------------------------------------------------------- the Methods in the loop
@pytest.fixture(scope="module")
def sft_path():
    from rlbook.sft import warm_start
    return str(warm_start(progress=False))


@pytest.mark.parametrize("M", [DPO, IPO, CDPO, RDPO, SIMPO, FDPO, RPO, KTO], ids=lambda m: m.name)
def test_methods_run_and_start_at_hand_value(M, sft_path, tmp_path):
    cfg = M.config(model=sft_path, steps=2, batch_size=8, eval_n=10, out=str(tmp_path), progress=False, device="cpu")
    o = type(M.options)(**{**M.options.__dict__, "n_pairs": 24})
    train(cfg, M, options=o)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    first = {"dpo": math.log(2), "cdpo": math.log(2), "rdpo": math.log(2), "fdpo": math.log(2), "ipo": 25.0, "kto": 0.5}
    if M.name in first:
        assert rows[0]["loss"] == pytest.approx(first[M.name], abs=1e-4)
    assert rows[0]["pairs/kept"] == 24


def test_resume_is_exact(sft_path, tmp_path):
    o = DPOConfig(n_pairs=24)
    def run(out, steps, resume):
        cfg = DPO.config(model=sft_path, steps=steps, batch_size=8, lr=1e-3, eval_n=10, out=str(out), progress=False,
                         device="cpu", resume=resume, save_every=2)
        return train(cfg, DPO, options=o)
    a = run(tmp_path / "a", 4, False)
    run(tmp_path / "b", 2, False)
    b = run(tmp_path / "b", 4, True)
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert la == pytest.approx(lb, abs=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_dpo_raises_margin_on_its_data(sft_path, tmp_path):
    "Behaviour: 30 steps at lr 1e-4 raise the implicit-reward accuracy on the training pairs above chance."
    o = DPOConfig(n_pairs=64)
    cfg = DPO.config(model=sft_path, steps=30, batch_size=16, lr=1e-4, eval_n=10, out=str(tmp_path), progress=False, device="cpu")
    train(cfg, DPO, options=o)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    late = rows[-8:]
    assert sum(r["rewards/accuracy"] for r in late) / len(late) > 0.6
    assert sum(r["loss"] for r in late) / len(late) < math.log(2) - 0.02


def test_offline_collect_without_setup_is_a_clear_error(sft_path, tmp_path):
    import dataclasses
    cfg = DPO.config(model=sft_path, steps=1, batch_size=4, eval_n=10, out=str(tmp_path), progress=False, device="cpu")
    with pytest.raises(RLBookError, match="PreferenceTask"):
        train(cfg, dataclasses.replace(DPO, setup=None), options=DPOConfig())


def test_dpo_refuses_a_bad_pairs_file_and_writes_nothing(tmp_path, monkeypatch):
    import rlbook.dpo as dpo
    from rlbook.train import TrainConfig

    def no_sampling(*a, **k):
        raise AssertionError("pairs were sampled although a pairs file was given")
    monkeypatch.setattr(dpo, "make_preference_pairs", no_sampling)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    cfg = TrainConfig(model="tiny", out=str(tmp_path / "run"), progress=False)
    with pytest.raises(RLBookError, match="bad.jsonl, line 1: no field 'rejected'"):
        train(cfg, DPO, options=DPOConfig(pairs_path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(RLBookError, match="no such file"):
        DPOConfig(pairs_path=str(tmp_path / "none.jsonl")).check()
    assert not (tmp_path / "run").exists()


def test_pairs_from_a_dataset_object_train_as_from_a_file(tmp_path):
    "pairs_path takes a datasets.Dataset from Python: the same update as the same records in a .jsonl file."
    import dataclasses
    import json as _json

    from datasets import Dataset

    records = [{"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"} for a in range(10, 30) for b in (3, 7)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(_json.dumps(r) + "\n" for r in records))
    weights = {}
    for name, source in (("file", str(path)), ("path", path), ("dataset", Dataset.from_list(records))):
        run = train(DPO.config(steps=1, batch_size=16, eval_n=4, device="cpu", progress=False, out=str(tmp_path / name)),
                    DPO, options=dataclasses.replace(DPO.options, pairs_path=source),
                    make_optimizer=lambda params, c: torch.optim.SGD(params, lr=0.05))
        weights[name] = run.model.state_dict()
        start = run.ref.state_dict()  # the frozen copy of the starting policy
        assert max(float((weights[name][k] - start[k]).abs().max()) for k in start) > 1e-4  # it trained
    for other in ("path", "dataset"):
        assert max(float((weights["file"][k] - weights[other][k]).abs().max()) for k in weights["file"]) < 1e-7
    with pytest.raises(RLBookError, match="pairs_path must be a file name, a hub id or a datasets.Dataset, got a list"):
        train(DPO.config(steps=1, out=str(tmp_path / "bad"), progress=False), DPO,
              options=dataclasses.replace(DPO.options, pairs_path=records))
