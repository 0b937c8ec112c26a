"""Credit across turns (chapter turn_credit): naive transcriptions of each estimator, the turn layout on real episodes,
the resumed environment, and the methods end to end."""
import pytest
import torch

import rlbook.agents  # noqa: F401  (registers the environment tasks)
from rlbook.cli import main
from rlbook.logprobs import completion_logprobs
from rlbook.models import load_policy
from rlbook.rollout import play
from rlbook.sft import task_warm_start
from rlbook.tasks import get_task
from rlbook.train import read_metrics
from rlbook.turn_credit import (Resumed, answer_probability, broadcast_turns, episode_turns, igpo_advantages,
                                information_gain_rewards, refuel_loss, turn_index, turn_starts, turn_td_advantages,
                                turn_texts)


@pytest.fixture(scope="module")
def episodes():
    task = get_task("guess_number")
    model, tok = load_policy(str(task_warm_start("guess_number")))
    task = task.with_tokenizer(tok)
    examples = task.sample(4, seed=3, split="train")
    ro = play(model, tok, task, examples, group_size=4, max_new_tokens=4, generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "completion_mask": ro.completion_mask,
             "turn_reward": ro.turn_reward}
    return task, model, tok, [e for e in examples for _ in range(4)], ro, batch


def naive_turn_index(mine: list, real: list) -> list:  # one row: a new turn after any environment token
    out, turn, after_env = [], -1, True
    for p, r in zip(mine, real):
        if p and after_env:
            turn += 1
        out.append(turn if p else -1)
        if r:
            after_env = not p
    return out


def test_turn_index_matches_a_naive_scan_and_the_episodes(episodes):
    _, _, _, _, ro, batch = episodes
    index = turn_index(ro.completion_mask, ro.completion_attention)
    for i in range(index.shape[0]):
        assert index[i].tolist() == naive_turn_index(ro.completion_mask[i].tolist(), ro.completion_attention[i].tolist())
    assert torch.equal(index.amax(-1) + 1, ro.turns)
    lay = episode_turns(batch)
    assert torch.equal(lay["turn_mask"].sum(-1), ro.turns)
    P = ro.prompt_ids.shape[1]
    env = torch.cat([ro.prompt_mask.bool(), ro.completion_attention.bool() & ~ro.completion_mask.bool()], 1)
    assert env.gather(1, lay["state"])[lay["turn_mask"]].all(), "a state is read at the prompt's or a reply's last token"
    starts = turn_starts(index, ro.turn_reward.shape[1])
    nxt = ro.completion_mask.gather(1, starts.clamp(min=0))[lay["turn_mask"]]
    assert nxt.bool().all() and torch.equal(lay["state"][lay["turn_mask"]], (P + starts - 1)[lay["turn_mask"]])


def test_broadcast_turns_gives_each_policy_token_its_turn_and_nothing_elsewhere(episodes):
    _, _, _, _, ro, batch = episodes
    lay = episode_turns(batch)
    per_turn = torch.randn(ro.turn_reward.shape)
    tok = broadcast_turns(per_turn, lay["index"])
    for i in range(tok.shape[0]):
        for c in range(tok.shape[1]):
            k = lay["index"][i, c]
            assert tok[i, c] == (per_turn[i, k] if k >= 0 else 0.0)


def test_turn_rewards_sum_to_the_return(episodes):
    ro = episodes[4]
    assert torch.allclose(ro.turn_reward.sum(-1), ro.reward)
    assert ro.turn_reward.shape[1] == int(ro.turns.max())


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_turn_td_advantages_naive(lam):
    torch.manual_seed(1)
    B, K, gamma = 5, 6, 0.95
    r, v = torch.randn(B, K), torch.randn(B, K)
    n = torch.tensor([6, 2, 1, 4, 5])
    m = torch.arange(K)[None] < n[:, None]
    adv, target = turn_td_advantages(r * m, v * m, m, gamma=gamma, lam=lam)
    for i in range(B):
        for k in range(n[i]):
            ret = sum(gamma ** (j - k) * r[i, j] for j in range(k, n[i]))  # lambda = 1: the return to go
            delta = [r[i, j] + (gamma * v[i, j + 1] if j + 1 < n[i] else 0.0) - v[i, j] for j in range(n[i])]
            want = sum((gamma * lam) ** (j - k) * delta[j] for j in range(k, n[i]))
            assert adv[i, k] == pytest.approx(float(want), abs=1e-5)
            assert target[i, k] == pytest.approx(float(want + v[i, k]), abs=1e-5)
            if lam == 1.0:
                assert adv[i, k] == pytest.approx(float(ret - v[i, k]), abs=1e-5)
        assert (adv[i, n[i]:] == 0).all() and (target[i, n[i]:] == 0).all()


def test_information_gain_and_igpo_advantages_naive():
    torch.manual_seed(2)
    B, K, G, gamma = 6, 4, 3, 0.9
    n = torch.tensor([4, 1, 3, 2, 4, 4])
    m = torch.arange(K)[None] < n[:, None]
    belief, env_r = torch.rand(B, K), torch.rand(B, K) * m
    r = information_gain_rewards(belief, env_r, m)
    adv = igpo_advantages(r, m, G, gamma=gamma)
    for g in range(B // G):
        rows = range(g * G, g * G + G)
        want = {(i, k): float(env_r[i, k] + (belief[i, k + 1] - belief[i, k] if k + 1 < n[i] else 0))
                for i in rows for k in range(n[i])}
        mu = sum(want.values()) / len(want)
        sd = (sum((x - mu) ** 2 for x in want.values()) / len(want)) ** 0.5
        for (i, k), x in want.items():
            assert r[i, k] == pytest.approx(x, abs=1e-6)
            a = sum(gamma ** (j - k) * (want[i, j] - mu) / (sd + 1e-6) for j in range(k, n[i]))
            assert adv[i, k] == pytest.approx(a, abs=1e-5)
    assert (r[~m] == 0).all() and (adv[~m] == 0).all()


def test_igpo_advantages_refuse_a_ragged_group():
    with pytest.raises(Exception, match="groups of 4"):
        igpo_advantages(torch.zeros(6, 2), torch.ones(6, 2, dtype=torch.bool), 4)


def test_refuel_loss_naive_and_its_optimum():
    torch.manual_seed(3)
    lp, lo, fut = torch.randn(8, 5), torch.randn(8, 5), torch.rand(8)
    mk = (torch.rand(8, 5) > 0.4).float()
    loss, _ = refuel_loss(lp, lo, mk, fut, eta=0.3)
    s = [float(((lp[i] - lo[i]) * mk[i]).sum()) for i in range(8)]
    naive = sum(((s[2 * j] - s[2 * j + 1]) / 0.3 - float(fut[2 * j] - fut[2 * j + 1])) ** 2 for j in range(4)) / 4
    assert loss.item() == pytest.approx(naive, rel=1e-5)
    # at the optimum the log-ratio gap is eta times the return gap: put it there and the loss is 0
    lp2 = lo.clone()
    lp2[0::2, 0] += 0.3 * (fut[0::2] - fut[1::2])
    m2 = torch.zeros_like(mk)
    m2[:, 0] = 1
    assert refuel_loss(lp2, lo, m2, fut, eta=0.3)[0].item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(Exception, match="pairs"):
        refuel_loss(lp[:3], lo[:3], mk[:3], fut[:3])


def test_answer_probability_equals_one_state_at_a_time(episodes):
    task, model, tok, rows, ro, batch = episodes
    lay = episode_turns(batch)
    answers = []
    for e in rows:
        env = task.make_env()
        env.reset(dict(e.meta)["seed"])
        answers.append(tok(env.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    got = answer_probability(model, ro.input_ids, ro.attention_mask, lay["state"], lay["turn_mask"], answers, chunk=7)
    for i in (0, 5, 11):
        for k in range(int(ro.turns[i])):
            pos = int(lay["state"][i, k])
            ctx = ro.input_ids[i, : pos + 1][ro.attention_mask[i, : pos + 1].bool()]
            ids = torch.cat([ctx, torch.tensor(answers[i])])[None]
            with torch.no_grad():
                lp = completion_logprobs(model, ids, torch.ones_like(ids), len(answers[i]))["logp"]
            assert got[i, k].item() == pytest.approx(lp.mean().exp().item(), rel=1e-4)
    assert (got[~lay["turn_mask"]] == 0).all()


def test_resumed_replays_an_episode_to_its_state(episodes):
    task, _, tok, rows, ro, _ = episodes
    actions = turn_texts(ro, tok)
    for i in range(len(rows)):
        seed = dict(rows[i].meta)["seed"]
        h = len(actions[i]) - 1
        env = Resumed(task.make_env, actions[i][:h], tok.eos_token, task.max_turns)
        text = env.reset(seed)
        full = tok.decode(ro.input_ids[i][ro.attention_mask[i].bool()], skip_special_tokens=False)
        assert full.replace(tok.pad_token or "\0", "").startswith(text)
        _, r, done = env.step(actions[i][-1])
        assert done and r == pytest.approx(ro.turn_reward[i, h].item())
        assert env.solved == bool(ro.solved[i])


@pytest.mark.parametrize("args, needle", [
    (["archer", "--task", "addition"], "single completions"),
    (["igpo", "--task", "lock"], "answer"),
    (["refuel", "--task", "guess_number", "--group-size", "8"], "group_size 2"),
])
def test_turn_credit_methods_refuse_what_they_cannot_do_in_one_line(args, needle, tmp_path, capsys):
    assert main(["train", *args, "--model", "tiny-sft", "--steps", "1", "--batch-size", "16", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("method", ["archer", "igpo", "refuel"])
def test_turn_credit_methods_train_from_the_command_line(method, tmp_path):
    out = tmp_path / "run"
    assert main(["train", method, "--task", "guess_number", "--model", "tiny-sft", "--steps", "2", "--batch-size", "32",
                 "--max-new-tokens", "4", "--eval-n", "20", "--no-progress", "--out", str(out)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["turns/total"] >= 32 and 1 <= rows[0]["turns/mean"] <= 10
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


# ---------------------------------------------------------------- the chapter's exercise, solved
def mc_turn_advantages(turn_reward, turn_value, turn_mask, gamma=1.0):
    "The return from each turn on, minus V(s_k); 0 off the mask."
    B, K = turn_reward.shape
    adv, running = torch.zeros(B, K), torch.zeros(B)
    for k in reversed(range(K)):
        running = turn_reward[:, k] * turn_mask[:, k] + gamma * running * turn_mask[:, k]
        adv[:, k] = (running - turn_value[:, k]) * turn_mask[:, k]
    return adv


def test_mc_turn_advantages_solution():
    torch.manual_seed(4)
    r, v = torch.randn(4, 5), torch.randn(4, 5)
    m = (torch.arange(5)[None] < torch.tensor([5, 2, 1, 3])[:, None]).float()
    want, _ = turn_td_advantages(r * m, v * m, m, gamma=0.9, lam=1.0)
    assert torch.allclose(mc_turn_advantages(r * m, v * m, m, gamma=0.9), want, atol=1e-6)
