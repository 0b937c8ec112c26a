"""Tests of the reward-model chapter (rlbook.reward_model): the Bradley-Terry loss on a hand example, the reward
read at the last real token, learning a known reward on a toy, the method through the one loop, and the solutions."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlbook.models import RLBookError, prepare_policy, tiny_policy
from rlbook.reward_model import (REWARD_MODEL, RMConfig, RewardModel, addition_gold, bradley_terry_loss,
                                 center_rewards, digit_pairs, ensemble_reward, last_index, load_reward_model,
                                 mean_digit, score_texts)
from rlbook.rollout import encode_pairs
from rlbook.train import build_run

torch.set_num_threads(1)


# ---------------------------------------------------------------- exercise solutions
def noisy_bt_loss(delta, eps):
    "Solution."
    return -torch.log(eps + (1 - 2 * eps) * torch.sigmoid(delta)).mean()


def fit_bt_scores(wins, steps=2000, lr=0.5):
    "Solution: gradient ascent on the BT log-likelihood of the win counts."
    s = torch.zeros(wins.shape[0], requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(steps):
        ll = (wins * F.logsigmoid(s[:, None] - s[None, :])).sum() / wins.sum()
        opt.zero_grad(); (-ll).backward(); opt.step()
    return (s - s.mean()).detach()


def test_noisy_bt_solution():
    d = torch.tensor([2.0, -1.0, 0.0])
    assert torch.allclose(noisy_bt_loss(d, 0.0), bradley_terry_loss(d, torch.zeros(3))[0], atol=1e-6)
    assert torch.allclose(noisy_bt_loss(d, 0.5), torch.tensor(math.log(2)), atol=1e-6)
    assert noisy_bt_loss(torch.tensor([-20.0]), 0.1) < -math.log(0.1) + 1e-6


def test_fit_bt_scores_solution():
    true = torch.tensor([0.0, 1.0, -1.0, 2.0])
    P = torch.sigmoid(true[:, None] - true[None, :])
    est = fit_bt_scores(1000 * P * (1 - torch.eye(4)))
    assert torch.allclose(est, true - true.mean(), atol=1e-2)


# ---------------------------------------------------------------- Bradley-Terry
def test_bt_hand_example():
    rw = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rl = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    loss, st = bradley_terry_loss(rw, rl)
    want = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert abs(loss.item() - want) < 1e-6
    loss.backward()
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert torch.allclose(rw.grad, torch.tensor([-(1 - sig(d)) / 3 for d in (1.0, 0.0, -2.0)]), atol=1e-6)
    assert torch.allclose(rl.grad, -rw.grad)
    assert abs(st["rewards/accuracy"] - 1 / 3) < 1e-6 and abs(st["rewards/margin"] + 1 / 3) < 1e-6


def test_bt_normaliser_and_weights():
    rw, rl = torch.randn(6), torch.randn(6)
    full, _ = bradley_terry_loss(rw, rl, n_seqs=6)
    halves = bradley_terry_loss(rw[:3], rl[:3], n_seqs=6)[0] + bradley_terry_loss(rw[3:], rl[3:], n_seqs=6)[0]
    assert torch.allclose(full, halves)  # gradient accumulation invariance
    w = torch.tensor([1.0, 0, 1, 0, 1, 0])
    assert torch.allclose(bradley_terry_loss(rw, rl, weight=w)[0], bradley_terry_loss(rw[::2], rl[::2])[0])


def test_label_smoothing_optimum():
    d = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([d], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        bradley_terry_loss(d[None], torch.zeros(1), label_smoothing=0.2)[0].backward()
        opt.step()
    assert abs(d.item() - math.log(0.8 / 0.2)) < 1e-3


# ---------------------------------------------------------------- the model
def _tiny_rm(seed=0, init_std=0.01, **kw):
    m, tok = tiny_policy(seed=seed, **kw)
    m, tok = prepare_policy(m, tok, torch.device("cpu"), torch.float32)
    return RewardModel(m, init_std=init_std), tok


def test_reward_read_at_last_real_token_padding_invariant():
    rm, tok = _tiny_rm(init_std=1.0)
    rm.eval()
    a = score_texts(rm, tok, ["7+8="], ["15"])
    b = score_texts(rm, tok, ["7+8=", "123+456="], ["15", "579 579 579"])
    assert torch.allclose(a, b[:1], atol=1e-5)
    enc = encode_pairs(tok, ["7+8=", "123+456="], ["15", "579 579 579"])
    idx = last_index(enc["attention_mask"])
    assert (enc["input_ids"].gather(1, idx[:, None]) == tok.eos_token_id).all()


def test_centring_and_ensembles():
    rm, tok = _tiny_rm(init_std=1.0)
    prompts, comps = ["1+1="] * 3 + ["2+2="] * 3, ["2", "3", "22", "4", "5", "44"]
    center_rewards(rm, tok, prompts, comps)
    assert abs(score_texts(rm, tok, prompts, comps).mean()) < 1e-5
    R = torch.randn(4, 10)
    assert torch.allclose(ensemble_reward(R, "min"), R.min(0).values)
    assert torch.allclose(ensemble_reward(R, "uwo", uncertainty_coef=0.0), R.mean(0))
    with pytest.raises(RLBookError):
        ensemble_reward(R, "median")


def test_gold_rewards():
    assert addition_gold("23+456=", "479") == 1.0 and addition_gold("23+456=", "478") == pytest.approx(2 / 3)
    assert addition_gold("99+1=", "100") == 1.0 and addition_gold("99+1=", "") == 0.0
    assert mean_digit("", "1234") == 2.5


def test_peaked_digit_is_the_mean_digit_up_to_its_peak_then_falls():
    from rlbook.reward_model import GOLDS, peaked_digit
    assert GOLDS["peaked_digit"] is peaked_digit
    for c in ("", "0", "1234", "57", "66", "3579"):  # mean digit <= 6: the mean digit itself
        assert peaked_digit("", c) == mean_digit("", c)
    assert peaked_digit("", "99") == pytest.approx(6 - 3 * 3) and peaked_digit("", "78") == pytest.approx(6 - 3 * 1.5)
    assert peaked_digit("", "99", peak=9.0) == 9.0 and peaked_digit("", "89", peak=8.0, slope=1.0) == pytest.approx(7.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # naive transcription on random digit strings: slope 1 up to the peak, -slope beyond
        c = "".join(str(int(d)) for d in torch.randint(0, 10, (int(torch.randint(1, 6, (), generator=g)),), generator=g))
        m = sum(int(d) for d in c) / len(c)
        assert peaked_digit("", c) == pytest.approx(m if m <= 6 else 6 - 3 * (m - 6))


def test_reward_model_learns_known_reward_on_toy():
    "Noise-free pairs of digit strings, gold = mean digit: held-out accuracy >= 0.9 on pairs at least 0.5 apart."
    torch.manual_seed(0)
    rm, tok = _tiny_rm(seed=0, n_layer=2)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    for s in range(300):
        p, c, r = digit_pairs(64, seed=s)
        enc = encode_pairs(tok, p + p, c + r)
        rew = rm(enc["input_ids"], enc["attention_mask"])
        loss, _ = bradley_terry_loss(rew[:64], rew[64:])
        opt.zero_grad(); loss.backward(); opt.step()
    p, c, r = digit_pairs(500, seed=10**6, min_gap=0.5)
    acc = (score_texts(rm, tok, p, c) > score_texts(rm, tok, p, r)).float().mean().item()
    assert acc >= 0.9, acc


def test_reward_model_method_through_train(tmp_path):
    from rlbook.sft import warm_start
    from rlbook.train import read_metrics, train
    start = str(warm_start(progress=False))
    cfg = REWARD_MODEL.config(model=start, steps=40, batch_size=32, eval_every=0, out=str(tmp_path / "rm"),
                              progress=False, device="cpu")
    o = RMConfig(eval_pairs=150)
    run = train(cfg, REWARD_MODEL, options=o)
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert rows[-1]["eval/accuracy"] > rows[0]["eval/accuracy"] + 0.1 and rows[-1]["eval/accuracy"] > 0.6
    rm, tok = load_reward_model(str(tmp_path / "rm"), device="cpu")
    x = score_texts(rm, tok, ["12+30="], ["42"])
    assert torch.allclose(x, score_texts(run.modules["rm"], tok, ["12+30="], ["42"]))
    with pytest.raises(RLBookError):
        RMConfig(label_noise=0.7).check()
    with pytest.raises(RLBookError):
        RMConfig(gold="length").check()


def test_rm_setup_is_deterministic_in_the_seed():
    from rlbook.sft import warm_start
    cfg = REWARD_MODEL.config(model=str(warm_start(progress=False)), device="cpu")
    a = build_run(cfg, REWARD_MODEL).modules["rm"].value_head.head.weight.clone()
    torch.randn(1000)
    b = build_run(cfg, REWARD_MODEL).modules["rm"].value_head.head.weight
    assert torch.equal(a, b)
