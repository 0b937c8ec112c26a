"""Tests of the entropy chapter (rlbook.entropy): the covariance identity on random softmax policies, the controls'
masks and gradients against naive loops, the bonus on an exact bandit, the entropy-law fit, pass@k, the options'
errors, short training runs of every control through train(), and the exercise solutions."""
import dataclasses
import math
from itertools import combinations

import pytest
import torch
from accelerate import Accelerator

from rlbook.entropy import (ENTROPY_CONTROLS, GRPO_ENTROPY, EntropyConfig, band_coef, check_entropy_options,
                            clip_cov_mask, entropy_bonus_loss, entropy_change_cov, entropy_contributions,
                            entropy_gradient, entropy_objective, fit_entropy_law, high_entropy_mask, kl_cov_loss,
                            kl_cov_mask, pass_at_k, pg_logit_change, sample_pass_at_k, stop_gradient,
                            token_covariance)
from rlbook.grpo import grpo_loss
from rlbook.logprobs import completion_logprobs, token_entropy
from rlbook.models import RLBookError, load_policy
from rlbook.rollout import generate
from rlbook.train import Run, read_metrics, train

torch.set_num_threads(1)


def H_of(z):
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


# ---------------------------------------------------------------- exercise solutions
def softmax_entropy_grad(logits):
    "Solution: dH/dz_b = -pi_b (log pi_b - E_pi log pi)."
    logp = logits.log_softmax(-1)
    p = logp.exp()
    return -p * (logp - (p * logp).sum(-1, keepdim=True))


def top_cov_mask(logp, adv, mask, k):
    "Solution: covariance over the valid tokens by hand, then the k largest."
    m = mask.bool()
    A = adv[:, None].expand_as(logp).float()
    lp = logp.float()
    cov = (lp - lp[m].mean()) * (A - A[m].mean())
    flat = cov.masked_fill(~m, -math.inf).flatten()
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[flat.topk(k).indices] = True
    return out.view_as(logp)


def pass_at_k_brute(correct, k):
    "Solution: enumerate every k-subset of the samples."
    subsets = list(combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_softmax_entropy_grad_solution():
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    want = torch.autograd.grad(H_of(zz).sum(), zz)[0]
    assert torch.allclose(softmax_entropy_grad(z), want, atol=1e-10)


def test_top_cov_mask_solution():
    g = torch.Generator().manual_seed(6)
    lp, m = -torch.rand(5, 7, generator=g) * 4, (torch.rand(5, 7, generator=g) > 0.2).long()
    a = torch.randn(5, generator=g)
    for k in (1, 3, 8):
        want = kl_cov_mask(token_covariance(lp, a, m), m, ratio=k / float(m.sum()) + 1e-9)
        assert torch.equal(top_cov_mask(lp, a, m, k), want)


def test_pass_at_k_brute_solution():
    for outcomes in ([0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 1, 1], [0, 1, 0, 0, 0, 0, 0, 1]):
        for k in range(1, len(outcomes) + 1):
            assert abs(pass_at_k_brute(outcomes, k) - pass_at_k(len(outcomes), sum(outcomes), k)) < 1e-12


# ---------------------------------------------------------------- the mechanism
@pytest.mark.parametrize("seed", range(5))
def test_covariance_identity_random_softmax(seed):
    "Done-when: dH/d(eps) at eps=0 along dz equals -Cov_pi(log pi, dz), to 1e-9, on random policies and directions."
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):
        K = int(torch.randint(2, 50, (1,), generator=g))
        z = torch.randn(K, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 6)
        dz = torch.randn(K, generator=g, dtype=torch.float64)
        eps = 1e-5
        fd = (H_of(z + eps * dz) - H_of(z - eps * dz)) / (2 * eps)
        assert abs(fd - entropy_change_cov(z, dz)).item() < 1e-9
        # and exactly the directional derivative by autograd
        zz = z.clone().requires_grad_(True)
        (gH,) = torch.autograd.grad(H_of(zz), zz)
        assert abs((gH * dz).sum() - entropy_change_cov(z, dz)).item() < 1e-12
        assert torch.allclose(gH, entropy_gradient(z), atol=1e-12)


def test_covariance_identity_batched_and_naive():
    g = torch.Generator().manual_seed(9)
    z, dz = torch.randn(3, 4, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    got = entropy_change_cov(z, dz)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            p = [math.exp(float(x)) for x in z[i, j]]
            p = [x / sum(p) for x in p]
            el = sum(pa * math.log(pa) for pa in p)
            ed = sum(pa * float(d) for pa, d in zip(p, dz[i, j]))
            cov = sum(pa * (math.log(pa) - el) * (float(d) - ed) for pa, d in zip(p, dz[i, j]))
            assert abs(got[i, j].item() + cov) < 1e-12
    assert torch.allclose(entropy_contributions(z, dz).sum(-1), got)


def test_pg_and_npg_logit_changes():
    g = torch.Generator().manual_seed(2)
    z, r = torch.randn(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    zz = z.clone().requires_grad_(True)
    gradJ = torch.autograd.grad((zz.softmax(-1) * r).sum(), zz)[0]
    assert torch.allclose(pg_logit_change(z, r, 0.3), 0.3 * gradJ, atol=1e-14)
    p = z.softmax(-1)
    F = torch.diag(p) - torch.outer(p, p)
    assert torch.allclose(F @ pg_logit_change(z, r, 0.3, natural=True), 0.3 * gradJ, atol=1e-14)


def test_which_tokens_drain_entropy():
    "Likely + positive advantage and unlikely + negative advantage lower entropy; the other quadrants raise it."
    z = torch.tensor([2.0, 2.0, -2.0, -2.0, 0.0], dtype=torch.float64)
    p = z.softmax(-1)
    for a_hi, a_lo, sign in ((1.0, 0.0, -1), (0.0, -1.0, -1), (-1.0, 0.0, 1), (0.0, 1.0, 1)):
        A = torch.tensor([a_hi, 0.0, a_lo, 0.0, 0.0], dtype=torch.float64)
        A = A - (p * A).sum()
        dH = entropy_change_cov(z, A).item()
        assert dH * sign > 0, (a_hi, a_lo, dH)


# ---------------------------------------------------------------- token covariance and controls
def _toy():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 6, generator=g) * 3
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return lp, torch.tensor([1.2, -0.8, 0.5, -0.9]), mask


def test_token_covariance_naive():
    lp, adv, mask = _toy()
    got = token_covariance(lp, adv, mask)
    valid = [(i, t) for i in range(4) for t in range(6) if mask[i, t]]
    ml = sum(float(lp[i, t]) for i, t in valid) / len(valid)
    ma = sum(float(adv[i]) for i, t in valid) / len(valid)
    for i in range(4):
        for t in range(6):
            want = (float(lp[i, t]) - ml) * (float(adv[i]) - ma) if mask[i, t] else 0.0
            assert abs(got[i, t].item() - want) < 1e-6


def test_clip_cov_zero_gradient_on_detached_tokens():
    lp0, adv, mask = _toy()
    cov = token_covariance(lp0, adv, mask)
    for ratio in (0.05, 0.2, 0.5):
        sel = clip_cov_mask(cov, mask, ratio=ratio, lb=0.0, ub=10.0, generator=torch.Generator().manual_seed(1))
        cand = (cov > 0) & (cov < 10) & (mask > 0)
        assert int(sel.sum()) == min(int(cand.sum()), max(1, int(ratio * mask.sum())))
        assert not (sel & ~cand).any()
        lp = lp0.clone().requires_grad_(True)
        loss, _ = grpo_loss(stop_gradient(lp, sel), lp0, adv, mask)
        loss.backward()
        assert (lp.grad[sel] == 0).all()
        assert (lp.grad[~sel & (mask > 0)] != 0).all()
        assert torch.allclose(loss, grpo_loss(lp0, lp0, adv, mask)[0])
    # different generators pick different subsets (it is random), the same generator the same one
    a = clip_cov_mask(cov, mask, ratio=0.1, lb=0.0, ub=10.0, generator=torch.Generator().manual_seed(0))
    b = clip_cov_mask(cov, mask, ratio=0.1, lb=0.0, ub=10.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_kl_cov_selection_penalty_and_gradient():
    lp0, adv, mask = _toy()
    cov = token_covariance(lp0, adv, mask)
    sel = kl_cov_mask(cov, mask, ratio=0.25)
    ranked = sorted(((cov[i, t].item(), i, t) for i in range(4) for t in range(6) if mask[i, t]), reverse=True)
    n = max(1, int(0.25 * int(mask.sum())))
    assert {(i, t) for _, i, t in ranked[:n]} == {tuple(x) for x in sel.nonzero().tolist()}
    d = 0.1 * torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    lp = (lp0 + d).requires_grad_(True)
    pen, _ = kl_cov_loss(lp, lp0, sel, mask, coef=0.7)
    assert abs(pen.item() - 0.7 * sum(abs(float(d[i, t])) for _, i, t in ranked[:n]) / int(mask.sum())) < 1e-6
    pen.backward()
    # the penalty pulls only the selected tokens, toward log pi_old: gradient = coef * sign(d) / N
    assert (lp.grad[~sel] == 0).all()
    assert torch.allclose(lp.grad[sel], 0.7 * d[sel].sign() / int(mask.sum()))


def test_high_entropy_mask_keeps_the_right_fraction():
    _, _, mask = _toy()
    ent = torch.rand(4, 6, generator=torch.Generator().manual_seed(8))
    N = int(mask.sum())
    for rho in (0.05, 0.2, 0.5, 0.8, 1.0):
        keep = high_entropy_mask(ent, mask, top_frac=rho)
        assert int(keep.sum()) == math.ceil(rho * N)
        assert not (keep & (mask == 0)).any()
        if rho < 1:
            assert ent[keep].min() >= ent[~keep & (mask > 0)].max()
    # trained only on kept tokens: the others get exactly zero gradient
    lp0, adv, _ = _toy()
    keep = high_entropy_mask(ent, mask, top_frac=0.2)
    lp = lp0.clone().requires_grad_(True)
    grpo_loss(stop_gradient(lp, ~keep & (mask > 0)), lp0, adv, mask)[0].backward()
    assert (lp.grad[~keep] == 0).all() and (lp.grad[keep] != 0).all()


def test_entropy_bonus_raises_entropy_in_one_exact_step():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        K = int(torch.randint(2, 20, (1,), generator=g))
        z = (torch.randn(K, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
        loss, _ = entropy_bonus_loss(token_entropy(z.view(1, 1, K)), torch.ones(1, 1), coef=0.1)
        grad = torch.autograd.grad(loss, z)[0]
        z0 = z.detach()
        if entropy_gradient(z0).abs().max() < 1e-12:  # uniform policy: already the maximum
            continue
        assert H_of(z0 - 0.5 * grad) > H_of(z0)
        # first-order change eta * alpha * |grad H|^2, through the covariance identity
        assert torch.isclose(entropy_change_cov(z0, -0.5 * grad), 0.05 * entropy_gradient(z0).pow(2).sum())


def test_bonus_naive_and_band_coef():
    ent = torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.4, 7.0]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert abs(entropy_bonus_loss(ent, m, coef=0.3)[0].item() + 0.3 * 2.1 / 5) < 1e-6
    for h in torch.linspace(0.0, 1.0, 21).tolist():
        want = 0.05 if h <= 0.3 else 0.0 if h >= 0.4 else 0.05 * (0.4 - h) / 0.1
        assert abs(band_coef(h, low=0.3, high=0.4, coef_max=0.05) - want) < 1e-12
    hs = torch.linspace(0, 1, 50).tolist()
    cs = [band_coef(h, low=0.3, high=0.4, coef_max=1.0) for h in hs]
    assert all(a >= b for a, b in zip(cs, cs[1:]))  # monotone: less entropy, more bonus


def test_fit_entropy_law():
    Hs = torch.linspace(0.05, 1.5, 20, dtype=torch.float64)
    for a, b in ((0.3, 1.2), (2.0, -0.5), (0.01, 0.7)):
        fit = fit_entropy_law(Hs.tolist(), (-a * Hs.exp() + b).tolist())
        assert abs(fit["a"] - a) < 1e-9 and abs(fit["b"] - b) < 1e-9 and abs(fit["r2"] - 1) < 1e-9
    noisy = -0.3 * Hs.exp() + 1.2 + 0.05 * torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = fit_entropy_law(Hs.tolist(), noisy.tolist())
    X = torch.stack([Hs.exp(), torch.ones(20, dtype=torch.float64)], 1)
    slope, icpt = torch.linalg.lstsq(X, noisy[:, None]).solution.flatten().tolist()
    assert abs(fit["a"] + slope) < 1e-8 and abs(fit["b"] - icpt) < 1e-8 and 0 < fit["r2"] < 1
    with pytest.raises(RLBookError):
        fit_entropy_law([0.3, 0.3], [0.1, 0.2])


def test_pass_at_k_naive_and_unbiased():
    for n in (1, 4, 10, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert abs(pass_at_k(n, c, k) - (1 - math.comb(n - c, k) / math.comb(n, k))) < 1e-12
    # unbiased over draws: with true success probability q, E[pass@k hat] = 1 - (1 - q)^k
    q, n, k = 0.3, 8, 3
    exp = sum(math.comb(n, c) * q ** c * (1 - q) ** (n - c) * pass_at_k(n, c, k) for c in range(n + 1))
    assert abs(exp - (1 - (1 - q) ** k)) < 1e-12
    for bad in ((4, 1, 0), (4, 1, 5), (4, 5, 1)):
        with pytest.raises(RLBookError):
            pass_at_k(*bad)


def test_sample_pass_at_k_problems_fixed_by_seed():
    "seed picks the problems, sample_seed only the sampling noise; greedy pass@k is the greedy accuracy on them."
    from rlbook.sft import warm_start
    from rlbook.tasks import get_task
    model, tok = load_policy(str(warm_start(progress=False)), device="cpu", seed=0)
    task = get_task("addition")
    kw = dict(n_problems=12, n_samples=3, ks=(1, 3), prompts_per_call=5)
    # default sample_seed is seed
    assert sample_pass_at_k(model, tok, task, seed=4, **kw) == sample_pass_at_k(model, tok, task, seed=4, sample_seed=4, **kw)
    # greedy: every sample is the same, so pass@1 = pass@3 = the greedy accuracy on the seed's problems, whatever sample_seed
    examples = task.sample(12, seed=4, split="test")
    ro = generate(model, tok, [e.prompt for e in examples], group_size=1, max_new_tokens=8, temperature=0.0)
    acc = sum(task.is_correct(e, c) for e, c in zip(examples, ro.completions)) / 12
    for ss in (0, 1, 9):
        got = sample_pass_at_k(model, tok, task, seed=4, sample_seed=ss, temperature=0.0, **kw)
        assert abs(got["pass@1"] - acc) < 1e-12 and abs(got["pass@3"] - acc) < 1e-12
    assert 0 < acc < 1  # the check above is not trivial


# ---------------------------------------------------------------- options, step, training
def test_options_errors():
    check_entropy_options(EntropyConfig())
    with pytest.raises(RLBookError, match="entropy_control must be one of"):
        check_entropy_options(EntropyConfig(entropy_control="entropy_bonus"))
    for bad in (dict(entropy_coef=-1.0), dict(entropy_low=0.5, entropy_high=0.5), dict(clip_cov_ratio=2.0),
                dict(clip_cov_lb=5.0, clip_cov_ub=1.0), dict(kl_cov_ratio=0.0), dict(kl_cov_coef=-0.1),
                dict(high_entropy_frac=1.5), dict(clip_higher_eps=0.0)):
        with pytest.raises(RLBookError, match="out of range"):
            check_entropy_options(EntropyConfig(**bad))
    with pytest.raises(RLBookError):
        EntropyConfig(entropy_control="nope").check()


def test_entropy_with_its_gradient_is_the_same_entropy():
    "The bonus differentiates the entropy: completion_logprobs(entropy_grad=True) keeps the graph, same values."
    model, tok = load_policy("tiny", device="cpu", seed=0)
    ro = generate(model, tok, ["12+34=", "7+8="], group_size=2, max_new_tokens=5, temperature=1.0,
                  generator=torch.Generator().manual_seed(0))
    args = (model, ro.input_ids, ro.attention_mask, ro.completion_mask.shape[1])
    got = completion_logprobs(*args, with_entropy=True, entropy_grad=True)
    want = completion_logprobs(*args, with_entropy=True)
    assert torch.equal(got["logp"], want["logp"]) and torch.equal(got["entropy"], want["entropy"])
    assert got["entropy"].requires_grad and not want["entropy"].requires_grad


def _tiny_minibatch(sample_seed: int, adv: torch.Tensor):  # tiny model, tokenizer, and a minibatch of 8 rollouts
    "Two prompts x 4 completions of the untrained tiny model, laid out as the loop's minibatch with advantages adv."
    model, tok = load_policy("tiny", device="cpu", seed=0)
    ro = generate(model, tok, ["12+34=", "7+8="], group_size=4, max_new_tokens=5, temperature=1.0,
                  generator=torch.Generator().manual_seed(sample_seed))
    mask = ro.completion_mask
    mb = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "completion_mask": mask,
          "logp_old": ro.logp, "adv": adv, "n_seqs": 8, "n_tokens": float(mask.sum())}
    return model, tok, mb


def test_step_clip_cov_stops_gradient_on_a_real_batch():
    "Through entropy_objective: the gradient of the loss wrt the tokens' log-probs is zero exactly on Clip-Cov's tokens."
    model, tok, mb = _tiny_minibatch(1, torch.tensor([1.0, -1.0, 1.0, -1.0, 0.5, 0.5, -0.5, -0.5]))
    mask = mb["completion_mask"]
    o = EntropyConfig(entropy_control="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9)

    run = Run(cfg=GRPO_ENTROPY.config(device="cpu"), policy=model, tokenizer=tok, task=None, accelerator=Accelerator(cpu=True),
              options=o)
    out = completion_logprobs(model, mb["input_ids"], mb["attention_mask"], mask.shape[1], with_entropy=True,
                              entropy_grad=True)
    out["logp"].retain_grad()
    loss, stats = entropy_objective(run, mb, out)
    loss.backward()
    g = out["logp"].grad
    zero = (g == 0) & (mask > 0)
    assert abs(stats["frac_selected"] - int(zero.sum()) / float(mask.sum())) < 1e-9
    assert int(zero.sum()) == max(1, int(0.2 * float(mask.sum())))


@pytest.mark.parametrize("control", ENTROPY_CONTROLS)
def test_train_every_control(control, tmp_path):
    o = dataclasses.replace(GRPO_ENTROPY.options, entropy_control=control)
    cfg = GRPO_ENTROPY.config(model="tiny", steps=1, batch_size=8, group_size=4, minibatch_size=4, eval_every=0,
                              eval_n=2, max_new_tokens=4, out=str(tmp_path), progress=False, device="cpu")
    train(cfg, GRPO_ENTROPY, options=o)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2 and math.isfinite(rows[0]["entropy"]) and math.isfinite(rows[0]["grad_norm"])
    assert ("entropy/coef" in rows[0]) == (control in ("bonus", "adaptive"))
    if control == "high_entropy":
        assert 0.2 <= rows[0]["frac_selected"] <= 0.2 + 1.0 / 4 + 1e-9


def test_bonus_raises_entropy_of_the_tiny_model():
    "A few large-coefficient bonus-only updates (zero advantages) raise the policy's entropy on a fixed batch."
    model, tok, mb = _tiny_minibatch(2, torch.zeros(8))
    run = Run(cfg=GRPO_ENTROPY.config(device="cpu"), policy=model, tokenizer=tok, task=None, accelerator=Accelerator(cpu=True),
              options=EntropyConfig(entropy_control="bonus", entropy_coef=1.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = GRPO_ENTROPY.loss(run, mb)[1]["entropy"]
    for _ in range(3):
        opt.zero_grad()
        GRPO_ENTROPY.loss(run, mb)[0].backward()
        opt.step()
    assert GRPO_ENTROPY.loss(run, mb)[1]["entropy"] > before
