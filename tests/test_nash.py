"""Nash algorithms: convergence to the exact equilibrium on exact games, rates, loss minimisers, LM methods."""
import math

import pytest
import torch

from rlbook.nash import (DNO, INPO, NASH_MD, SPPO, dno_loss, dno_step, inpo_loss, inpo_step, leave_one_out_winrate,
                         minimise_logits, nash_md_eta, nash_md_step, nash_mp_step, spo_step, sppo_step)
from rlbook.preferences import (duality_gap, kl_categorical, nash_equilibrium, random_intransitive_game,
                                rock_paper_scissors, transitive_game)

BETA = 0.1
GAMES = [transitive_game(K=6, seed=0), rock_paper_scissors(0.3, ref=[0.6, 0.3, 0.1]), random_intransitive_game(K=6, seed=0)]


def iterate(step, logpi, n):
    for t in range(n):
        logpi = step(logpi, t)
    return logpi


# solutions of the chapter's code exercises
def omwu_step(logpi, prev_logpi, P, eta):
    return torch.log_softmax(logpi + eta * (2 * P @ logpi.exp() - P @ prev_logpi.exp()), 0)


def inpo_pairs_loss_value(logpi_new, logpi_old, ref, P, eta, beta):
    d = lambda v: (v[:, None] - v[None, :]).flatten()
    W = torch.outer(logpi_old.exp(), logpi_old.exp()).flatten()
    return inpo_loss(d(logpi_new), d(ref.log()), d(logpi_old), P.flatten(), eta=eta, beta=beta, weight=W)[0]


def test_exercise_solutions():
    rps = rock_paper_scissors(0.3)
    prev = cur = torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64))
    for _ in range(3000):
        prev, cur = cur, omwu_step(cur, prev, rps.P, 0.5)
    assert duality_gap(cur.exp(), rps.P, rps.ref, 0.0) < 1e-3
    game = random_intransitive_game(K=4, seed=5)
    l0 = game.ref.log()
    best = inpo_step(l0, game.P, game.ref, 0.1, 2.0)
    v = inpo_pairs_loss_value(best, l0, game.ref, game.P, 2.0, 0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        other = torch.log_softmax(best + 0.1 * torch.randn(4, generator=g, dtype=torch.float64), 0)
        assert inpo_pairs_loss_value(other, l0, game.ref, game.P, 2.0, 0.1) >= v - 1e-12


@pytest.mark.parametrize("game", GAMES, ids=lambda g: g.name)
def test_nash_mp_follows_its_rate(game):
    star = nash_equilibrium(game.P, game.ref, BETA)
    logpi = game.ref.log()
    kl0 = kl_categorical(star, logpi.exp()).item()
    for t in range(1, 120):
        logpi = nash_mp_step(logpi, game.P, game.ref, BETA)
        bound = kl0 * (1 + 2 * BETA) ** (-t)
        if bound < 1e-13:
            break
        assert kl_categorical(star, logpi.exp()).item() <= bound * (1 + 1e-6)
    assert kl_categorical(star, logpi.exp()).item() < 1e-12


@pytest.mark.parametrize("game", GAMES, ids=lambda g: g.name)
def test_regularised_methods_converge_to_the_exact_equilibrium(game):
    P, ref = game.P, game.ref
    star = nash_equilibrium(P, ref, BETA)
    kl = lambda l: kl_categorical(star, l.exp()).item()
    assert kl(iterate(lambda l, t: inpo_step(l, P, ref, BETA, 2.0), ref.log(), 200)) < 1e-10
    spo = iterate(lambda l, t: spo_step(l, P, ref, BETA, 5.0), ref.log(), 2000)
    assert kl(torch.log_softmax(spo, 0)) < (1e-4 if game.reward is not None else 1e-8)  # slow near a nearly pure equilibrium
    md = iterate(lambda l, t: nash_md_step(l, P, ref, BETA, nash_md_eta(t, BETA)), ref.log(), 2000)
    assert kl(md) < 1e-6
    assert abs(duality_gap(md.exp(), P, ref, BETA)) < 1e-5


def test_nash_md_rate_and_constant_step_bias():
    game = GAMES[2]
    P, ref = game.P, game.ref
    star = nash_equilibrium(P, ref, BETA)
    kls = {}
    logpi = ref.log()
    for t in range(4000):
        logpi = nash_md_step(logpi, P, ref, BETA, nash_md_eta(t, BETA))
        if t + 1 in (500, 1000, 2000, 4000):
            kls[t + 1] = kl_categorical(star, logpi.exp()).item()
    for T in (1000, 2000, 4000):  # O(1/T): doubling T at least halves the KL (up to 10 %)
        assert kls[T] < 0.55 * kls[T // 2]
    const = iterate(lambda l, t: nash_md_step(l, P, ref, BETA, 1.0), ref.log(), 3000)
    assert kl_categorical(star, const.exp()).item() > 1e-4  # a floor of order eta


@pytest.mark.parametrize("step_name", ["sppo", "dno"])
def test_multiplicative_weights_average_iterate(step_name):
    step = (lambda l, P: sppo_step(l, P, 1.0)) if step_name == "sppo" else (lambda l, P: dno_step(l, P, 1.0))
    for game in (rock_paper_scissors(0.3, ref=[0.6, 0.3, 0.1]), transitive_game(K=6, seed=0)):
        logpi, avg, T = game.ref.log(), torch.zeros(len(game.ref), dtype=torch.float64), 4000
        for _ in range(T):
            avg += logpi.exp()
            logpi = step(logpi, game.P)
        assert duality_gap(avg / T, game.P, game.ref, 0.0) < 0.01
    rps = rock_paper_scissors(0.3, ref=[0.6, 0.3, 0.1])
    # last iterate on rock-paper-scissors does not converge
    last = iterate(lambda l, t: step(l, rps.P), rps.ref.log(), 300)
    assert duality_gap(last.exp(), rps.P, rps.ref, 0.0) > 0.2
    # average iterate on rock-paper-scissors approaches the uniform von Neumann winner
    logpi, avg = rps.ref.log(), torch.zeros(3, dtype=torch.float64)
    for _ in range(4000):
        avg += logpi.exp()
        logpi = step(logpi, rps.P)
    assert torch.allclose(avg / 4000, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)


def test_loss_minimisers_give_the_updates():
    game = random_intransitive_game(K=5, seed=3)
    P, ref, eta = game.P, game.ref, 2.0
    logpi = torch.log_softmax(torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 0)
    pi = logpi.exp()
    W = torch.outer(pi, pi).flatten()
    d = lambda v: (v[:, None] - v[None, :]).flatten()
    f = lambda th: inpo_loss(d(torch.log_softmax(th, 0)), d(ref.log()), d(logpi), P.flatten(), eta=eta, beta=BETA, weight=W)[0]
    assert torch.allclose(minimise_logits(f, logpi.clone()), inpo_step(logpi, P, ref, BETA, eta), atol=1e-9)
    r = P @ pi
    f = lambda th: dno_loss(d(torch.log_softmax(th, 0)), d(logpi), torch.sigmoid(d(r)), eta=0.5, weight=W)[0]
    assert torch.allclose(minimise_logits(f, logpi.clone()), dno_step(logpi, P, 0.5), atol=1e-8)


def test_leave_one_out_winrate():
    pref = torch.tensor([[[0.5, 0.8, 0.2], [0.2, 0.5, 0.8], [0.8, 0.2, 0.5]]])
    assert torch.allclose(leave_one_out_winrate(pref), torch.tensor([[0.5, 0.5, 0.5]]))
    pref = torch.tensor([[[0.5, 0.9], [0.1, 0.5]]])
    assert torch.allclose(leave_one_out_winrate(pref), torch.tensor([[0.9, 0.1]]))


@pytest.mark.parametrize("method", [NASH_MD, INPO, SPPO, DNO], ids=lambda m: m.name)
def test_lm_methods_train(method, tmp_path):
    from rlbook.sft import warm_start
    from rlbook.train import read_metrics, train
    cfg = method.config(model=str(warm_start(progress=False)), steps=2, batch_size=8, group_size=4, out=str(tmp_path),
                        progress=False, eval_n=10, device="cpu")
    train(cfg, method)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any(r.get("grad_norm", 0) > 0 for r in rows)


def test_run_exact_runs_from_the_module():
    "The exported experiment driver needs nothing from the notebook's namespace (it once used duality_gap unimported)."
    from rlbook.nash import run_exact
    rows = run_exact(rock_paper_scissors(0.3, ref=[0.6, 0.3, 0.1]), beta=0.1, iters=40)
    assert {r["method"] for r in rows} == {"nash_mp", "nash_md", "nash_md_const", "inpo", "spo", "sppo", "dno"}
    mp = [r for r in rows if r["method"] == "nash_mp"]
    assert mp[-1]["kl"] < mp[0]["kl"] * (1 + 2 * 0.1) ** -40 * 1.0001 and mp[-1]["gap"] >= -1e-12
