"""Tests of the GRPO chapter (rlbook.grpo): equations against naive loops, gradient identities on a real
batch of the tiny model, accumulation invariance, a short training run, and the exercise solutions."""
import math

import pytest
import torch

from rlbook.grpo import (ADV_SCALES, DAPO, DR_GRPO, GRPO, GSPO, LITE_PPO, NFT, RATIOS, GRPOConfig, batch_std,
                         check_options, difficulty_mask, group_advantages, grpo_loss, nft_loss, no_std,
                         overlong_penalty, sequence_ratio, zero_std_groups)
from rlbook.logprobs import AGGREGATIONS, completion_logprobs, seq_mean, token_mean
from rlbook.models import RLBookError, load_policy
from rlbook.reinforce import rloo_advantages
from rlbook.rollout import generate
from rlbook.train import read_metrics, train

torch.set_num_threads(1)


# ---------------------------------------------------------------- exercise solutions
def centred_from_rloo(reward: torch.Tensor, group_size: int) -> torch.Tensor:
    "Solution: RLOO's leave-one-out advantage is G/(G-1) times the centred one."
    return rloo_advantages(reward, group_size) * (group_size - 1) / group_size


def token_weights(adv: torch.Tensor, lengths: torch.Tensor, aggregation: str, constant: int) -> torch.Tensor:
    "Solution: the per-token ascent weight -dL/dlogpi at ratio 1."
    B = adv.shape[0]
    if aggregation == "seq_mean":
        return adv / (B * lengths.float())
    if aggregation == "token_mean":
        return adv / lengths.sum().float()
    if aggregation == "constant":
        return adv / (B * constant)
    raise ValueError(aggregation)


def test_centred_from_rloo_solution():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert torch.allclose(centred_from_rloo(r, 4), group_advantages(r, 4, scale=no_std, eps=0.0), atol=1e-6)
    r = torch.rand(12)  # any rewards, any group size
    assert torch.allclose(centred_from_rloo(r, 3), group_advantages(r, 3, scale=no_std, eps=0.0), atol=1e-6)


@pytest.mark.parametrize("name", ["seq_mean", "token_mean", "constant"])
def test_token_weights_solution(name):
    lens = torch.tensor([2, 8, 3, 3])
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    mask = (torch.arange(8)[None] < lens[:, None]).long()
    lp = torch.zeros(4, 8, requires_grad=True)
    grpo_loss(lp, lp.detach(), adv, mask, aggregate=AGGREGATIONS[name], constant=8)[0].backward()
    assert torch.allclose(token_weights(adv, lens, name, 8), -lp.grad[:, 0])


# ---------------------------------------------------------------- advantages and filters
def test_advantages_zero_mean_and_naive():
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(40, generator=g) > 0.5).float()
    for scale in ADV_SCALES.values():
        A = group_advantages(r, 8, scale=scale)
        assert torch.allclose(A.view(-1, 8).sum(-1), torch.zeros(5), atol=1e-5)
    A = group_advantages(r, 8, eps=0.0)
    for k in range(5):
        grp = r[8 * k: 8 * k + 8].tolist()
        m = sum(grp) / 8
        s = math.sqrt(sum((x - m) ** 2 for x in grp) / 8)
        for j, x in enumerate(grp):
            assert abs(A[8 * k + j].item() - ((x - m) / s if s > 0 else 0.0)) < 1e-5
    Ab = group_advantages(r, 8, scale=batch_std, eps=0.0)
    assert torch.allclose(Ab, (r - r.view(-1, 8).mean(-1).repeat_interleave(8)) / r.std(correction=0), atol=1e-6)


def test_zero_variance_and_bad_shapes():
    r = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 1.0])
    assert (group_advantages(r, 3)[:3] == 0).all()
    assert zero_std_groups(r, 3).tolist() == [True] * 3 + [False] * 3
    with pytest.raises(RLBookError):
        group_advantages(torch.ones(5), 2)


def test_filters_and_overlong():
    r = torch.tensor([1., 1., 1., 1., 0., 1., 0., 0., 0., 0., 0., 0., 1., 1., 1., 0.])
    assert difficulty_mask(r, 4).view(-1, 4)[:, 0].tolist() == [False, True, False, True]
    assert difficulty_mask(r, 4, drop_zero_std=False, acc_min=0.3, acc_max=0.8).view(-1, 4)[:, 0].tolist() == [
        False, False, False, True]
    shaped = torch.tensor([1.5, 1.3, 1.5, 1.3, -0.2, -0.2, 0.8, -0.2, 0.5, 0.3, 0.5, 0.5])  # a format term, a call cost
    assert difficulty_mask(shaped, 4, drop_zero_std=False).all(), "the default band (0, 1) bounds nothing"
    assert difficulty_mask(shaped, 4, drop_zero_std=False, acc_max=0.9).view(-1, 4)[:, 0].tolist() == [False, True, True]
    assert difficulty_mask(shaped, 4, drop_zero_std=False, acc_min=0.1).view(-1, 4)[:, 0].tolist() == [True, False, True]
    L = torch.tensor([1, 5, 6, 7, 8])
    assert torch.allclose(overlong_penalty(L, 8, 3, penalty=0.5), torch.tensor([0., 0., -1 / 6, -1 / 3, -0.5]))


# ---------------------------------------------------------------- losses vs naive transcriptions (2x3)
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
OLD = torch.tensor([[-1.3, -0.5, -1.5], [-0.3, -0.9, -0.2]])
REF = torch.tensor([[-1.1, -0.6, -1.0], [-0.5, -1.0, -0.4]])
ADV = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def naive_grpo(agg, sequence, lo, hi, beta, kl):
    per = [[0.0] * 3 for _ in range(2)]
    for i in range(2):
        n_i = int(MASK[i].sum())
        s_i = math.exp(sum(float(LOGP[i, t] - OLD[i, t]) for t in range(3) if MASK[i, t]) / n_i)
        for t in range(3):
            rho = s_i if sequence else math.exp(float(LOGP[i, t] - OLD[i, t]))
            a = float(ADV[i])
            surr = min(rho * a, min(max(rho, 1 - lo), 1 + hi) * a)
            d = float(LOGP[i, t] - REF[i, t])  # log pi/pi_ref
            k = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[kl]
            per[i][t] = -surr + beta * k
    tot = [sum(per[i][t] for t in range(3) if MASK[i, t]) for i in range(2)]
    n = [int(MASK[i].sum()) for i in range(2)]
    return {"token_mean": sum(tot) / sum(n), "seq_mean": (tot[0] / n[0] + tot[1] / n[1]) / 2,
            "seq_sum": sum(tot) / 2, "constant": sum(tot) / (2 * 3)}[agg]


@pytest.mark.parametrize("agg", list(AGGREGATIONS))
@pytest.mark.parametrize("ratio", list(RATIOS))
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_grpo_loss_naive(agg, ratio, kl):
    from rlbook.logprobs import KL_ESTIMATORS
    got, _ = grpo_loss(LOGP, OLD, ADV, MASK, ref_logp=REF, beta=0.1, clip_eps_low=0.2, clip_eps_high=0.28,
                       ratio_fn=RATIOS[ratio], aggregate=AGGREGATIONS[agg], kl=KL_ESTIMATORS[kl], constant=3)
    assert abs(got.item() - naive_grpo(agg, ratio == "sequence", 0.2, 0.28, 0.1, kl)) < 1e-6


def test_sequence_ratio_naive():
    s = sequence_ratio(LOGP, OLD, MASK)
    assert torch.allclose(s[1], torch.full((3,), math.exp((0.0 - 0.3) / 2)))
    assert torch.allclose(s[0], torch.full((3,), math.exp((0.3 + 0.0 - 0.5) / 3)))


def test_nft_loss_naive():
    correct, acc = torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5])
    tot = []
    for i in range(2):
        w = math.sqrt((1 - float(acc[i])) / float(acc[i]))
        s = 0.0
        for t in range(3):
            if MASK[i, t]:
                R = math.exp(float(LOGP[i, t] - OLD[i, t]))
                neg = math.log(max((1 - float(acc[i]) * R) / (1 - float(acc[i])), 0.01))
                s += -w * (float(correct[i]) * math.log(R) + (1 - float(correct[i])) * neg)
        tot.append(s / int(MASK[i].sum()))
    assert abs(nft_loss(LOGP, OLD, correct, acc, MASK)[0].item() - sum(tot) / 2) < 1e-6


# ---------------------------------------------------------------- gradient identities on a real batch
@pytest.fixture(scope="module")
def real():
    model, tok = load_policy("tiny", device="cpu", seed=1)
    ro = generate(model, tok, ["12+34=", "7+8=", "100+23=", "5+55="], group_size=4, max_new_tokens=6,
                  temperature=1.0, generator=torch.Generator().manual_seed(1))
    reward = (ro.completion_ids[:, 0] % 2).float()
    reward[:4] = 0.0  # a zero-variance group
    if reward[4:].view(-1, 4).std(-1).min() == 0:  # keep the other groups mixed
        reward[4:] = torch.tensor([1.0, 0.0, 0.0, 1.0] * 3)
    return model, ro, reward


def flat_grad(model, loss):
    model.zero_grad()
    loss.backward()
    g = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    model.zero_grad()
    return g


def test_first_step_loss_zero_grad_nonzero(real):
    model, ro, reward = real
    out = completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask.shape[1])
    loss, st = grpo_loss(out["logp"], ro.logp, group_advantages(reward, 4), ro.completion_mask,
                         ref_logp=out["logp"].detach(), beta=0.04)
    assert abs(loss.item()) < 1e-5
    assert flat_grad(model, loss).norm() > 1e-3
    assert st["clipfrac"] == 0.0 and abs(st["approx_kl"]) < 1e-6


@pytest.mark.parametrize("agg", list(AGGREGATIONS))
def test_zero_variance_group_no_gradient(real, agg):
    model, ro, reward = real
    lp = completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_mask.shape[1])["logp"]
    lp = lp.detach().requires_grad_(True)
    grpo_loss(lp, ro.logp, group_advantages(reward, 4), ro.completion_mask, aggregate=AGGREGATIONS[agg],
              constant=6)[0].backward()
    assert (lp.grad[:4] == 0).all() and lp.grad[4:].abs().sum() > 0


@pytest.mark.parametrize("agg", list(AGGREGATIONS))
@pytest.mark.parametrize("ratio", list(RATIOS))
def test_accumulation_invariance(real, agg, ratio):
    model, ro, reward = real
    A = group_advantages(reward, 4)
    T, B = ro.completion_mask.shape[1], ro.input_ids.shape[0]
    norm = dict(n_seqs=B, n_tokens=float(ro.completion_mask.sum()), constant=T)

    def loss_on(rows):
        o = completion_logprobs(model, ro.input_ids[rows], ro.attention_mask[rows], T)["logp"]
        return grpo_loss(o, ro.logp[rows] - 0.05, A[rows], ro.completion_mask[rows], aggregate=AGGREGATIONS[agg],
                         ratio_fn=RATIOS[ratio], **norm)[0]  # off-policy by 0.05 nats: the clip is active

    whole = flat_grad(model, loss_on(torch.arange(B)))
    parts = flat_grad(model, sum(loss_on(torch.arange(s, s + 4)) for s in range(0, B, 4)))
    assert torch.allclose(whole, parts, atol=1e-6)


@pytest.mark.parametrize("agg", [seq_mean, token_mean])
def test_nft_equals_grpo_on_policy(real, agg):
    model, ro, reward = real
    T = ro.completion_mask.shape[1]
    acc = reward.view(-1, 4).mean(-1).repeat_interleave(4)

    def fwd():
        return completion_logprobs(model, ro.input_ids, ro.attention_mask, T)["logp"]

    o = fwd()
    g_grpo = flat_grad(model, grpo_loss(o, o.detach(), group_advantages(reward, 4, eps=0.0), ro.completion_mask,
                                        aggregate=agg)[0])
    o = fwd()
    g_nft = flat_grad(model, nft_loss(o, o.detach(), reward, acc, ro.completion_mask, aggregate=agg)[0])
    assert g_grpo.norm() > 1e-3
    assert torch.allclose(g_grpo, g_nft, atol=1e-6)


# ---------------------------------------------------------------- assembly
def test_options_checked():
    check_options(GRPOConfig())
    for bad in (dict(adv_std="std"), dict(aggregation="mean"), dict(ratio_level="seq"), dict(kl_estimator="k4"),
                dict(beta=-1.0)):
        with pytest.raises(RLBookError):
            check_options(GRPOConfig(**bad))


def test_methods_are_configurations():
    from dataclasses import fields
    from rlbook.train import TrainConfig
    clash = {f.name for f in fields(GRPOConfig)} & {f.name for f in fields(TrainConfig)}
    assert not clash
    for m in (GRPO, DR_GRPO, DAPO, LITE_PPO, GSPO, NFT):
        check_options(m.options)
        assert m.defaults["model"] == "tiny-sft-sloppy" and m.setup is not None  # the main job's warm start
        assert m.defaults["batch_size"] % m.defaults["group_size"] == 0


@pytest.mark.parametrize("method", [GRPO, DAPO, NFT])
def test_short_training_run_logs_the_diagnostics(tmp_path, method):
    # the random tiny model and a reward that depends only on the first character keep this fast and hub-free
    from rlbook.tasks import Addition

    class FirstCharIsDigit(Addition):
        def reward(self, example, completion):
            return float(completion[:1].isdigit())

    cfg = method.config(model="tiny", steps=2, batch_size=16, group_size=4, eval_n=8, eval_every=0,
                        out=str(tmp_path / method.name), progress=False, device="cpu")
    train(cfg, method, task=FirstCharIsDigit())
    row = read_metrics(tmp_path / method.name / "metrics.jsonl")[0]
    need = {"reward/mean", "len/mean", "frac_truncated", "frac_reward_zero_std", "entropy", "grad_norm", "loss"}
    need |= {"kl/ref"} if method.options.beta > 0 else set()
    need |= {"clipfrac"} if method is not NFT else set()
    assert need <= set(row), need - set(row)
    assert all(math.isfinite(row[k]) for k in need)


def test_gspo_equals_grpo_seq_mean_on_policy(real):
    from rlbook.ppo import token_ratio
    model, ro, reward = real
    T = ro.completion_mask.shape[1]
    A = group_advantages(reward, 4)
    grads = []
    for ratio_fn in (token_ratio, sequence_ratio):
        o = completion_logprobs(model, ro.input_ids, ro.attention_mask, T)["logp"]
        grads.append(flat_grad(model, grpo_loss(o, o.detach(), A, ro.completion_mask, ratio_fn=ratio_fn,
                                                aggregate=seq_mean)[0]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].norm() > 1e-3


def test_options_out_of_range_are_refused_in_one_line():
    "Each coefficient out of range (NaN included) gives one line naming it; the defaults of every variant pass."
    from rlbook.grpo import DAPO, DR_GRPO, GRPO, GSPO, LITE_PPO, NFT
    for m in (GRPO, DR_GRPO, DAPO, LITE_PPO, GSPO, NFT):
        m.options.check()
    for bad, name in [(dict(acc_min=0.9, acc_max=0.1), "would mask every group"), (dict(clip_eps_low=-0.2), "clip_eps_low"),
                      (dict(clip_eps_high=float("nan")), "clip_eps_high"), (dict(beta=float("nan")), "beta"),
                      (dict(overlong_cache=1.5), "overlong_cache"), (dict(overlong_penalty=-0.5), "overlong_penalty"),
                      (dict(nft_min_ratio=-1.0), "nft_min_ratio"), (dict(acc_max=float("nan")), "acc_max")]:
        with pytest.raises(RLBookError, match=name) as err:
            GRPOConfig(**bad).check()
        assert "\n" not in str(err.value)
