"""Dense credit (chapter 41): implicit process rewards, PRIME, CISPO, SAPO, TIS, the corrected KL.

The solutions of the chapter's exercises are the same-named functions below."""

import itertools
import math
import random
from dataclasses import replace

import pytest
import torch

from rlbook.dense_credit import (
    CISPO,
    GRPO_TIS,
    IMPLICIT_PRM,
    IS_CORRECTIONS,
    PRIME,
    SAPO,
    ArithmeticChain,
    OffPolicyConfig,
    PRIMEConfig,
    check_offpolicy,
    chain_warm_start,
    cispo_loss,
    first_error_guess,
    first_wrong_step,
    implicit_prm_loss,
    implicit_q,
    implicit_reward,
    implicit_token_rewards,
    importance_corrected_kl,
    inject_step_error,
    parse_steps,
    prime_advantages,
    sapo_loss,
    score_steps,
    step_ends,
    step_rewards,
    token_truncated_is,
    weighted,
)
from rlbook.grpo import GRPOConfig, grpo_loss
from rlbook.logprobs import kl_k3, seq_mean, token_mean
from rlbook.models import RLBookError, load_policy
from rlbook.reinforce import rloo_advantages
from rlbook.rollout import encode_pairs
from rlbook.train import build_run, read_metrics, train


# ---- exercise solutions --------------------------------------------------------------------------


def step_rewards_naive(
    logp: torch.Tensor, ref_logp: torch.Tensor, ends: torch.Tensor, beta: float
) -> torch.Tensor:
    "Solution: beta * the sum of log pi/pi_ref over each step's tokens, step by step."
    B, K = ends.shape
    out = torch.zeros(B, K)
    for i in range(B):
        start = 0
        for k in range(K):
            e = int(ends[i, k])
            if e < 0:
                continue
            out[i, k] = beta * float((logp[i, start : e + 1] - ref_logp[i, start : e + 1]).sum())
            start = e + 1
    return out


def sapo_token_weight(
    ratio: float, adv: float, tau_pos: float = 1.0, tau_neg: float = 1.05
) -> float:
    "Solution: d/dlogpi of (4/tau) sigmoid(tau (rho - 1)) = 4 rho sigmoid (1 - sigmoid)."
    tau = tau_pos if adv > 0 else tau_neg
    s = 1 / (1 + math.exp(-tau * (ratio - 1)))
    return 4 * ratio * s * (1 - s)


def test_step_rewards_solution():
    g = torch.Generator().manual_seed(0)
    lp, rl = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mk = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    ends = torch.tensor([[1, 4, 6], [2, 4, -1], [2, -1, -1]])
    assert torch.allclose(
        step_rewards_naive(lp, rl, ends, 0.3),
        step_rewards(implicit_q(lp, rl, mk, beta=0.3), ends),
        atol=1e-5,
    )


@pytest.mark.parametrize("rho", [0.5, 1.0, 1.3, 3.0])
@pytest.mark.parametrize("a", [1.0, -0.5])
def test_sapo_weight_solution(rho, a):
    x = torch.tensor([[math.log(rho)]], requires_grad=True)
    sapo_loss(x, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1))[0].backward()
    assert abs(sapo_token_weight(rho, a) - (-float(x.grad) / a)) < 1e-5


# ---- the implicit PRM ----------------------------------------------------------------------------


def _tensors(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    return (-torch.rand(B, T, generator=g) * 2, -torch.rand(B, T, generator=g) * 2, mask, g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_implicit_rewards_naive(seed):
    lp, rl, mask, _ = _tensors(seed)
    beta = 0.3
    tok, q, r = (
        implicit_token_rewards(lp, rl, mask, beta=beta),
        implicit_q(lp, rl, mask, beta=beta),
        implicit_reward(lp, rl, mask, beta=beta),
    )
    for i in range(lp.shape[0]):
        acc = 0.0
        for t in range(lp.shape[1]):
            term = beta * (float(lp[i, t]) - float(rl[i, t])) if mask[i, t] else 0.0
            acc += term
            assert abs(float(tok[i, t]) - term) < 1e-6 and abs(float(q[i, t]) - acc) < 1e-5
        assert abs(float(r[i]) - acc) < 1e-5


def test_implicit_ce_loss_naive_and_gradient_sign():
    lp, rl, mask, _ = _tensors(3)
    label = torch.tensor([1.0, 0.0, 1.0, 0.0])
    beta = 0.5
    x = lp.clone().requires_grad_(True)
    loss, st = implicit_prm_loss(x, rl, mask, label, beta=beta)
    naive = 0.0
    for i in range(4):
        r = beta * sum(float(lp[i, t] - rl[i, t]) for t in range(5) if mask[i, t])
        p = 1 / (1 + math.exp(-r))
        naive += -(label[i] * math.log(p) + (1 - label[i]) * math.log(1 - p))
    assert abs(float(loss.detach()) - naive / 4) < 1e-5
    loss.backward()
    # gradient descent raises the log-probs of right answers and lowers those of wrong ones
    assert (x.grad[0][mask[0].bool()] < 0).all() and (x.grad[1][mask[1].bool()] > 0).all()
    assert (x.grad[~mask.bool()] == 0).all()
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    lw, _ = implicit_prm_loss(lp, rl, mask, label, beta=beta, weight=w, n_seqs=4)
    l3, _ = implicit_prm_loss(
        lp[[0, 2, 3]], rl[[0, 2, 3]], mask[[0, 2, 3]], label[[0, 2, 3]], beta=beta
    )
    assert torch.allclose(lw, l3 * 3 / 4)


def _tables(seed, V=2, T=3):
    g = torch.Generator().manual_seed(seed)
    return {
        p: torch.randn(V, generator=g).log_softmax(-1)
        for t in range(T)
        for p in itertools.product(range(V), repeat=t)
    }


def _logps(table, y):
    return torch.stack([table[tuple(y[:t])][y[t]] for t in range(len(y))])


def test_partial_sums_are_soft_q_values():
    "@eq-implicit-q on an exact tree: q_t = beta log E_ref[exp(r/beta) | y_<=t] for any phi."
    phi, ref = _tables(5), _tables(6)
    beta, V, T = 0.4, 2, 3
    for y in itertools.product(range(V), repeat=T):
        q = implicit_q(_logps(phi, y)[None], _logps(ref, y)[None], torch.ones(1, T), beta=beta)[0]
        for t in range(1, T + 1):
            tot = sum(
                math.exp(float(_logps(ref, y[:t] + rest)[t:].sum()))
                * math.exp(float((_logps(phi, y[:t] + rest) - _logps(ref, y[:t] + rest)).sum()))
                for rest in itertools.product(range(V), repeat=T - t)
            )
            assert abs(beta * math.log(tot) - float(q[t - 1])) < 1e-5


def _tabular_prm(V=2, T=3):
    "A trainable tabular autoregressive model: one logit vector per prefix."
    prefixes = [p for t in range(T) for p in itertools.product(range(V), repeat=t)]
    return {p: torch.zeros(V, requires_grad=True) for p in prefixes}


def test_constructed_single_wrong_step_gets_the_lowest_step_reward():
    """An implicit PRM fitted on outcome labels only (an answer is right iff every step is token 0)
    blames the one wrong step of each answer that has exactly one: its step reward is the lowest."""
    T, V, beta = 3, 2, 1.0
    ref = {p: torch.zeros(V).log_softmax(-1) for p in _tabular_prm(V, T)}  # uniform reference
    phi = _tabular_prm(V, T)
    ys = list(itertools.product(range(V), repeat=T))
    label = torch.tensor([1.0 if all(v == 0 for v in y) else 0.0 for y in ys])
    opt = torch.optim.Adam(list(phi.values()), lr=0.1)
    for _ in range(300):
        lp = torch.stack(
            [torch.stack([phi[y[:t]].log_softmax(-1)[y[t]] for t in range(T)]) for y in ys]
        )
        rl = torch.stack([_logps(ref, y) for y in ys])
        loss, _ = implicit_prm_loss(lp, rl, torch.ones(len(ys), T), label, beta=beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        lp = torch.stack(
            [torch.stack([phi[y[:t]].log_softmax(-1)[y[t]] for t in range(T)]) for y in ys]
        )
        rl = torch.stack([_logps(ref, y) for y in ys])
        mask = torch.ones(len(ys), T)
        ends = torch.arange(T).expand(len(ys), T)  # one token per step
        sr = step_rewards(implicit_q(lp, rl, mask, beta=beta), ends)
        r = implicit_reward(lp, rl, mask, beta=beta)
    assert (r[label == 1] > 0).all() and (r[label == 0] < 0).all()  # a good outcome classifier
    single = [i for i, y in enumerate(ys) if sum(v != 0 for v in y) == 1]
    assert len(single) == 3
    for i in single:
        wrong = next(k for k, v in enumerate(ys[i]) if v != 0)
        assert int(first_error_guess(sr[i : i + 1], ends[i : i + 1])) == wrong, (ys[i], sr[i])


def test_step_ends_and_rewards_on_the_tokenizer():
    _, tok = load_policy("tiny", device="cpu", seed=0)
    enc = encode_pairs(tok, ["86+8*2+4=", "12+7=", "1+1="], ["94;188;192", "19;5", "2"])
    sep = tok(";", add_special_tokens=False)["input_ids"]
    ends = step_ends(enc["completion_ids"], enc["completion_mask"], sep)
    assert ends.tolist() == [[2, 6, 10], [2, 4, -1], [1, -1, -1]]
    assert (
        step_ends(enc["completion_ids"], enc["completion_mask"], sep, n_steps=4)[:, 3].tolist()
        == [-1] * 3
    )
    q = torch.randn(3, enc["completion_mask"].shape[1])
    sr = step_rewards(q, ends)
    # the step rewards of a row sum to q at its last token (the telescoping sum of @eq-step-reward)
    last = enc["completion_mask"].sum(-1) - 1
    assert torch.allclose(sr.sum(-1), q.gather(1, last[:, None])[:, 0], atol=1e-6)


def test_score_steps_zero_for_the_reference_and_ranks_a_changed_model():
    model, tok = load_policy(str(chain_warm_start(progress=False)), device="cpu")
    task = ArithmeticChain()
    ex = task.sample(8, seed=0, split="test")
    s = score_steps(model, model, tok, [e.prompt for e in ex], [e.solution for e in ex], beta=0.1)
    assert s["step_rewards"].abs().max() == 0 and s["reward"].abs().max() == 0
    assert (s["ref_logp"] < 0).all()


# ---- the task ------------------------------------------------------------------------------------


def test_chain_task_and_injected_errors():
    task = ArithmeticChain()
    rng = random.Random(0)
    for e in task.sample(300, seed=2):
        vals = dict(e.meta)["values"]
        assert parse_steps(e.solution) == list(vals) and task.is_correct(e, e.solution)
        k = rng.randrange(3)
        bad = inject_step_error(e, k, rng)
        assert first_wrong_step(e, bad) == k and not task.is_correct(e, bad)
        assert sum(a != b for a, b in zip(parse_steps(bad), vals[: k + 1])) == 1
    e = task.sample(1, seed=0)[0]
    assert first_wrong_step(e, "") == 0 and first_wrong_step(e, "x;1;2") == 0
    with pytest.raises(RLBookError, match="step must be in"):
        inject_step_error(e, 3, rng)
    with pytest.raises(RLBookError, match="max_start"):
        ArithmeticChain(max_start=5)


# ---- PRIME ---------------------------------------------------------------------------------------


def _verl_prime(token_r, acc, mask, n, dpo_coef, gt_coef):
    "verl recipe/prime/prime_core_algos.py compute_rloo_advantage_return, before whitening."

    def masked_rloo(reward_tensor_original, mask_tensor):
        reward_tensor = reward_tensor_original.clone()
        reward_tensor[~mask_tensor] = 0
        for start_pos in range(0, reward_tensor.shape[0], n):
            cur_rewards_mean = torch.cat(
                [
                    reward_tensor[pos : pos + 1][mask_tensor[pos : pos + 1]].mean(
                        dim=0, keepdim=True
                    )
                    for pos in range(start_pos, start_pos + n)
                ],
                dim=0,
            )
            base = cur_rewards_mean.sum() / (n - 1)
            sl = slice(start_pos, start_pos + n)
            reward_tensor[sl][mask_tensor[sl]] = (
                reward_tensor[sl][mask_tensor[sl]] * (n / (n - 1)) - base
            )
        return reward_tensor

    out = masked_rloo(token_r, mask.bool()) * dpo_coef
    lengths = mask.sum(-1)
    acc_t, acc_m = torch.zeros_like(token_r), torch.zeros_like(mask, dtype=torch.bool)
    acc_m[torch.arange(len(lengths)), lengths - 1] = True
    acc_t[torch.arange(len(lengths)), lengths - 1] = acc
    out = out + masked_rloo(acc_t, acc_m) * gt_coef
    return (out * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("G", [2, 4])
def test_prime_advantages_equal_verl(seed, G):
    g = torch.Generator().manual_seed(seed)
    B, T = 3 * G, 7
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    tr = torch.randn(B, T, generator=g) * mask
    acc = torch.randint(0, 2, (B,), generator=g).float()
    for pc, oc in ((5.0, 5.0), (1.0, 0.0), (0.0, 1.0)):
        mine = prime_advantages(tr, acc, mask, G, process_coef=pc, outcome_coef=oc, whiten=False)
        assert torch.allclose(mine, _verl_prime(tr, acc, mask, G, pc, oc), atol=1e-5)
    naive = torch.zeros(B, T)  # the displayed formula, @eq-prime-adv, as a loop
    for i in range(B):
        grp = range(i // G * G, i // G * G + G)
        means = [float(tr[j, : int(lens[j])].mean()) for j in grp]
        others = [float(acc[j]) for j in grp if j != i]
        run = 0.0
        for t in reversed(range(int(lens[i]))):
            r = G / (G - 1) * float(tr[i, t]) - sum(means) / (G - 1)
            if t == int(lens[i]) - 1:
                r += float(acc[i]) - sum(others) / (G - 1)
            run += r
            naive[i, t] = run
    assert torch.allclose(prime_advantages(tr, acc, mask, G, whiten=False), naive, atol=1e-5)
    assert torch.allclose(
        prime_advantages(tr, acc, mask, G, process_coef=0.0, whiten=False),
        rloo_advantages(acc, G)[:, None] * mask,
    )


def test_prime_masked_groups_do_not_move_the_others():
    g = torch.Generator().manual_seed(4)
    G, T = 4, 5
    mask = torch.ones(3 * G, T, dtype=torch.long)
    tr, acc = torch.randn(3 * G, T, generator=g), torch.randint(0, 2, (3 * G,), generator=g).float()
    a = prime_advantages(tr, acc, mask, G, whiten=False)
    m2 = mask.clone()
    m2[G : 2 * G] = 0  # the second group filtered out
    b = prime_advantages(tr, acc, m2, G, whiten=False)
    assert (
        torch.allclose(a[:G], b[:G])
        and torch.allclose(a[2 * G :], b[2 * G :])
        and (b[G : 2 * G] == 0).all()
    )


def test_prime_setup_and_options_checked():
    cfg = PRIME.config(model="tiny", device="cpu")
    run = build_run(cfg, PRIME, options=replace(PRIME.options, process_coef=0.0))
    assert run.ref is None and run.modules == {}
    run = build_run(cfg, PRIME)
    assert set(run.modules) == {"prm"} and run.ref is not None
    assert all(p.requires_grad for p in run.modules["prm"].parameters())
    assert not any(p.requires_grad for p in run.ref.parameters())
    with pytest.raises(RLBookError, match="prm_beta > 0"):
        PRIMEConfig(prm_beta=0.0).check()


# ---- CISPO, SAPO, TIS, the corrected KL ----------------------------------------------------------


def _trl_cispo(per_token_logps, old, advantages, mask, epsilon_high):
    "trl/trainer/grpo_trainer.py (commit f2cd577) lines 3080-3082; aggregation 3139-3141."
    coef_1 = torch.exp(per_token_logps - old)
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    per_token_loss = -clamped_ratios * advantages.unsqueeze(1) * per_token_logps
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def _trl_sapo(per_token_logps, old, advantages, mask, t_pos, t_neg):
    "trl/trainer/grpo_trainer.py (commit f2cd577) lines 3092-3095; 'sapo' aggregation, line 3124."
    coef_1 = torch.exp(per_token_logps - old)
    advantages = advantages.unsqueeze(1)
    temperatures = torch.where(advantages > 0, t_pos, t_neg)
    soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    per_token_loss = -soft_coef_1 * advantages
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _trl_is(old, sampling, mask, mode, clip_max):
    "trl/trainer/grpo_trainer.py (commit f2cd577) lines 2579-2622: vllm_importance_sampling_ratio."
    d = (old - sampling) * mask
    d = d.sum(dim=-1, keepdim=True) if mode in ("sequence_mask", "sequence_truncate") else d
    ratio = torch.exp(d)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=None, max=clip_max)
    return ratio.masked_fill((ratio < -math.inf) | (ratio > clip_max), value=0.0)


def _trl_kl(per_token_logps, ref, old):
    "trl/trainer/grpo_trainer.py (commit f2cd577) lines 3069-3076 with use_bias_correction_kl."
    per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    return per_token_kl * torch.exp(per_token_logps - old)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_equal_trl_and_naive(seed):
    lp, old, mask, g = _tensors(seed, B=4, T=6)
    lp = old + 0.5 * torch.randn(old.shape, generator=g)  # ratios well away from 1
    ref = old + 0.3 * torch.randn(old.shape, generator=g)
    adv = torch.randn(4, generator=g)
    for cap in (1.1, 5.0):
        got, st = cispo_loss(lp, old, adv, mask, cap=cap)
        assert torch.allclose(got, _trl_cispo(lp, old, adv, mask, cap), atol=1e-6)
        naive, n = 0.0, 0
        for i in range(4):
            for t in range(6):
                if mask[i, t]:
                    naive -= (
                        min(math.exp(float(lp[i, t] - old[i, t])), cap)
                        * float(adv[i])
                        * float(lp[i, t])
                    )
                    n += 1
        assert abs(float(got) - naive / n) < 1e-5
    for tp, tn in ((1.0, 1.05), (2.0, 4.0)):
        got, _ = sapo_loss(lp, old, adv, mask, tau_pos=tp, tau_neg=tn)
        assert torch.allclose(got, _trl_sapo(lp, old, adv, mask, tp, tn), atol=1e-6)
    sampler = old + 0.4 * torch.randn(old.shape, generator=g)
    for mode, fn in IS_CORRECTIONS.items():
        assert torch.allclose(
            fn(old, sampler, mask, cap=2.0), _trl_is(old, sampler, mask, mode, 2.0) * mask
        )
    assert torch.allclose(
        importance_corrected_kl(lp, ref, old) * mask, _trl_kl(lp, ref, old) * mask, atol=1e-6
    )
    # TRL multiplies the per-token loss by the IS ratio before aggregating: weighted() does the same
    w = token_truncated_is(old, sampler, mask, cap=2.0)
    got, _ = cispo_loss(lp, old, adv, mask, is_weight=w)
    trl = (-(torch.exp(lp - old).clamp(max=5.0)) * adv[:, None] * lp * w * mask).sum() / mask.sum()
    assert torch.allclose(got, trl, atol=1e-6)
    gw, _ = grpo_loss(lp, old, adv, mask, aggregate=weighted(token_mean, w))
    ratio = torch.exp(lp - old)
    per = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * w
    assert torch.allclose(gw, (per * mask).sum() / mask.sum(), atol=1e-6)
    assert weighted(seq_mean, None) is seq_mean


def _token_grad(loss_fn, rho, a, **kw):
    x = torch.tensor([[math.log(rho)]], requires_grad=True)
    loss_fn(x, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1), **kw)[0].backward()
    return -float(x.grad)


@pytest.mark.parametrize("rho,a", [(1.5, 1.0), (0.5, -1.0), (1.25, 2.0)])
def test_cispo_keeps_the_gradient_grpo_clips(rho, a):
    assert _token_grad(grpo_loss, rho, a, aggregate=token_mean) == 0.0
    assert abs(_token_grad(cispo_loss, rho, a) - min(rho, 5.0) * a) < 1e-5
    assert abs(_token_grad(cispo_loss, 7.0, a) - 5.0 * a) < 1e-4  # the cap
    assert _token_grad(sapo_loss, rho, a) * a > 0  # SAPO: smaller, but not zero


def test_on_policy_gradients_coincide_on_the_real_model():
    "With rho = 1 GRPO, CISPO and SAPO give the same gradient (same aggregation, beta = 0)."
    model, tok = load_policy("tiny", device="cpu", seed=0)
    from rlbook.rollout import generate
    from rlbook.logprobs import completion_logprobs

    ro = generate(
        model,
        tok,
        ["12+34=", "7+8="],
        group_size=4,
        max_new_tokens=6,
        generator=torch.Generator().manual_seed(0),
    )
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -1.0, -1.0])
    ids, att = (
        torch.cat([ro.prompt_ids, ro.completion_ids], 1),
        torch.cat([ro.prompt_mask, ro.completion_mask], 1),
    )

    def grad(loss_fn, **kw):
        model.zero_grad()
        out = completion_logprobs(model, ids, att, ro.completion_ids.shape[1])["logp"]
        loss_fn(out, out.detach(), adv, ro.completion_mask, aggregate=token_mean, **kw)[
            0
        ].backward()
        return torch.cat([p.grad.flatten().clone() for p in model.parameters()])

    g0 = grad(grpo_loss)
    assert g0.norm() > 0
    assert torch.allclose(grad(cispo_loss), g0, atol=1e-6) and torch.allclose(
        grad(sapo_loss), g0, atol=1e-6
    )


def test_corrected_kl_is_unbiased_and_gives_the_reverse_kl_gradient():
    g = torch.Generator().manual_seed(1)
    old_l, ref_l = torch.randn(6, generator=g), torch.randn(6, generator=g)
    theta = (old_l + 0.7 * torch.randn(6, generator=g)).requires_grad_(True)
    lt, lr, lo = theta.log_softmax(-1), ref_l.log_softmax(-1), old_l.log_softmax(-1)
    p_old = lo.exp()
    corr = (p_old * importance_corrected_kl(lt, lr, lo)).sum()
    kl = (lt.exp() * (lt - lr)).sum()
    assert torch.allclose(corr, kl, atol=1e-6)
    (g1,), (g2,) = (
        torch.autograd.grad(corr, theta, retain_graph=True),
        torch.autograd.grad(kl, theta, retain_graph=True),
    )
    assert torch.allclose(g1, g2, atol=1e-6)
    (g3,) = torch.autograd.grad((p_old * kl_k3(lt, lr)).sum(), theta)
    assert (g3 - g2).norm() > 1e-2  # uncorrected: a different gradient once theta has left pi_old
    # Monte-Carlo: sampled from pi_old, the corrected estimate averages to the KL
    y = torch.multinomial(p_old, 200_000, replacement=True, generator=g)
    est = importance_corrected_kl(lt[y], lr[y], lo[y]).mean()
    assert abs(float(est) - float(kl)) < 0.02


def test_offpolicy_options_checked_and_methods_are_configurations():
    check_offpolicy(OffPolicyConfig())
    with pytest.raises(RLBookError, match="tis_mode must be one of"):
        check_offpolicy(OffPolicyConfig(tis_mode="token-truncate"))
    with pytest.raises(RLBookError, match="sync_every >= 1"):
        check_offpolicy(OffPolicyConfig(sync_every=0))
    with pytest.raises(RLBookError, match="aggregation must be one of"):
        check_offpolicy(OffPolicyConfig(aggregation="mean"))
    assert isinstance(CISPO.options, GRPOConfig) and CISPO.options.aggregation == "token_mean"
    assert SAPO.options.aggregation == "seq_mean" and GRPO_TIS.options.tis_cap == 2.0
    assert [m.name for m in (PRIME, CISPO, SAPO, GRPO_TIS, IMPLICIT_PRM)] == [
        "prime",
        "cispo",
        "sapo",
        "grpo_tis",
        "implicit_prm",
    ]


# ---- the loop: exact resume with the extra modules, and a learning check -------------------------


@pytest.mark.parametrize(
    "method,opts",
    [
        (PRIME, replace(PRIME.options, acc_min=0.0, acc_max=1.0)),
        (GRPO_TIS, replace(GRPO_TIS.options, sync_every=3)),
    ],
)
def test_resume_is_exact_with_prm_and_lagging_sampler(tmp_path, method, opts):
    "The PRM and the lagging sampler are checkpointed: 2 + 2 resumed steps equal 4 straight ones."
    start = str(chain_warm_start(progress=False))
    task = ArithmeticChain()
    kw = dict(
        model=start,
        batch_size=8,
        group_size=4,
        eval_every=0,
        eval_n=5,
        progress=False,
        device="cpu",
    )

    def run(steps, out, resume=False):
        cfg = method.config(steps=steps, out=str(out), resume=resume, **kw)
        return train(
            cfg, method, task=task, options=opts
        )

    a = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    b = run(4, tmp_path / "b", resume=True)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    for k in a.modules:
        for pa, pb in zip(a.modules[k].parameters(), b.modules[k].parameters()):
            assert torch.equal(pa, pb), k
    ra, rb = (
        read_metrics(tmp_path / "a" / "metrics.jsonl"),
        read_metrics(tmp_path / "b" / "metrics.jsonl"),
    )
    key = "prm/loss" if method is PRIME else "kl/sampler"
    assert [r.get(key) for r in ra[:4]] == [r.get(key) for r in rb[:4]]


def test_implicit_prm_learns_to_locate_injected_errors(tmp_path):
    """A short PRM fit on right and one-step-wrong worked solutions (answer labels only) finds the
    wrong step of held-out answers far more often than the 1/3 of guessing."""
    start = str(chain_warm_start(progress=False))
    task = ArithmeticChain()
    beta = 0.5

    def collect(run):
        ex = task.sample(16, seed=run.step, split="train")
        rng = random.Random(run.step)
        comps = [e.solution for e in ex] + [inject_step_error(e, rng.randrange(3), rng) for e in ex]
        batch = encode_pairs(run.tokenizer, [e.prompt for e in ex] * 2, comps)
        with torch.no_grad():
            from rlbook.logprobs import completion_logprobs

            batch["ref_logp"] = completion_logprobs(
                run.ref,
                batch["input_ids"],
                batch["attention_mask"],
                batch["completion_mask"].shape[1],
            )["logp"]
        batch["reward"] = torch.tensor([1.0] * 16 + [0.0] * 16)
        return batch, {}

    cfg = IMPLICIT_PRM.config(
        model=start,
        steps=60,
        batch_size=32,
        lr=3e-4,
        out=str(tmp_path),
        progress=False,
        device="cpu",
        eval_n=5,
    )
    opts = replace(IMPLICIT_PRM.options, prm_beta=beta)
    run = train(
        cfg,
        replace(IMPLICIT_PRM, collect=collect),
        task=task,
        options=opts,
        evaluate_fn=lambda r: {},
    )
    ex = task.sample(150, seed=7, split="test")
    rng = random.Random(7)
    ks = [rng.randrange(3) for _ in ex]
    bad = [inject_step_error(e, k, rng) for e, k in zip(ex, ks)]
    s = score_steps(
        run.model.eval(), run.ref, run.tokenizer, [e.prompt for e in ex], bad, beta=beta, n_steps=3
    )
    acc = (
        (first_error_guess(s["step_rewards"], s["ends"]) == torch.tensor(ks)).float().mean().item()
    )
    assert acc > 0.6, acc


def test_chains_are_a_task_of_the_command_line():
    "arith_chain is registered: get_task, --task and --model tiny-sft (the chapter's own warm start) know it."
    from rlbook.cli import check_task_name, resolve_model
    from rlbook.dense_credit import CISPO, PRIME, ArithmeticChain, chain_warm_start
    from rlbook.tasks import get_task
    assert type(get_task("arith_chain", n_steps=2)) is ArithmeticChain
    check_task_name("arith_chain")  # no error
    assert PRIME.config().task == "arith_chain" and CISPO.config().task == "arith_chain"
    assert resolve_model("tiny-sft", "arith_chain", progress=False) == str(chain_warm_start(progress=False))
