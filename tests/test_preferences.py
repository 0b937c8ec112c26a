"""General preferences: games, the exact regularised Nash equilibrium, duality gaps, the Bradley–Terry failure."""
import pytest
import torch

from rlbook.models import RLBookError
from rlbook.preferences import (best_response, bt_fit, bt_policy, check_preference_matrix, duality_gap,
                                kl_categorical, nash_equilibrium, optimality_residual, preference_payoff,
                                random_intransitive_game, rock_paper_scissors, transitive_game, win_rates)

GAMES = [transitive_game(K=6, seed=0), rock_paper_scissors(0.3, ref=[0.6, 0.3, 0.1]), random_intransitive_game(K=6, seed=0)]


# solutions of the chapter's code exercises
def condorcet_winner(P):
    K = P.shape[0]
    for i in range(K):
        if all(P[i, j] > 0.5 for j in range(K) if j != i):
            return i
    return None


def exploitability(pi, P):
    return float((P @ pi).max() - 0.5)


def test_exercise_solutions():
    tg = transitive_game(K=6, seed=0)
    assert condorcet_winner(tg.P) == int(tg.reward.argmax())
    assert condorcet_winner(rock_paper_scissors().P) is None
    assert condorcet_winner(random_intransitive_game(K=6, seed=1).P) == 3
    game = random_intransitive_game(K=5, seed=2)
    for pi in (game.ref, nash_equilibrium(game.P, game.ref, 0.05), torch.eye(5, dtype=torch.float64)[0]):
        assert abs(exploitability(pi, game.P) - duality_gap(pi, game.P, game.ref, 0.0) / 2) < 1e-12


@pytest.mark.parametrize("game", GAMES, ids=lambda g: g.name)
def test_payoff_is_antisymmetric(game):
    g = torch.Generator().manual_seed(1)
    K = game.P.shape[0]
    for _ in range(20):
        a = torch.softmax(2 * torch.randn(K, generator=g, dtype=torch.float64), 0)
        b = torch.softmax(2 * torch.randn(K, generator=g, dtype=torch.float64), 0)
        assert abs(preference_payoff(a, b, game.P) + preference_payoff(b, a, game.P) - 1) < 1e-12
        assert abs(preference_payoff(a, a, game.P) - 0.5) < 1e-12
        assert torch.isclose(win_rates(game.P, b) @ a, preference_payoff(a, b, game.P))


def test_check_preference_matrix_rejects():
    with pytest.raises(RLBookError):
        check_preference_matrix([[0.5, 0.7], [0.7, 0.5]])
    with pytest.raises(RLBookError):
        check_preference_matrix([[0.5, 1.2], [-0.2, 0.5]])
    with pytest.raises(RLBookError):
        nash_equilibrium(rock_paper_scissors().P, rock_paper_scissors().ref, 0.0)


@pytest.mark.parametrize("game", GAMES, ids=lambda g: g.name)
@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_nash_is_certified(game, beta):
    pi = nash_equilibrium(game.P, game.ref, beta, tol=1e-10)
    assert optimality_residual(pi.log(), game.P, game.ref, beta) < 1e-10
    assert abs(duality_gap(pi, game.P, game.ref, beta)) < 1e-9
    # no random deviation of either player improves its payoff
    g = torch.Generator().manual_seed(0)
    K = game.P.shape[0]
    f = lambda p, q: float(preference_payoff(p, q, game.P) - beta * kl_categorical(p, game.ref) + beta * kl_categorical(q, game.ref))
    for _ in range(100):
        d = torch.softmax(3 * torch.randn(K, generator=g, dtype=torch.float64), 0)
        assert f(d, pi) <= f(pi, pi) + 1e-10 and f(pi, d) >= f(pi, pi) - 1e-10


def test_gap_positive_away_from_equilibrium_and_closed_form():
    game = random_intransitive_game(K=5, seed=1)
    beta = 0.2
    pi_star = nash_equilibrium(game.P, game.ref, beta)
    f = lambda p, q: float(preference_payoff(p, q, game.P) - beta * kl_categorical(p, game.ref) + beta * kl_categorical(q, game.ref))
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
        q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
        literal = f(best_response(q, game.P, game.ref, beta), q) - f(p, best_response(p, game.P, game.ref, beta))
        assert abs(literal - duality_gap(p, game.P, game.ref, beta, q)) < 1e-12
        assert duality_gap(p, game.P, game.ref, beta) > 0
    assert (pi_star - game.ref).abs().sum() > 0.1  # the equilibrium is not the reference


def test_symmetric_cases():
    rps = rock_paper_scissors(0.3)
    assert torch.allclose(nash_equilibrium(rps.P, rps.ref, 0.03), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-9)
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    assert torch.allclose(nash_equilibrium(torch.full((4, 4), 0.5, dtype=torch.float64), ref, 0.1), ref)
    tg = transitive_game(K=6, seed=0)
    assert nash_equilibrium(tg.P, tg.ref, 0.01)[tg.reward.argmax()] > 0.99


def test_bt_fit_recovers_transitive_reward():
    for seed in range(3):
        tg = transitive_game(K=5, seed=seed)
        for w in (None, torch.outer(tg.ref, tg.ref)):
            assert torch.allclose(bt_fit(tg.P, w), tg.reward - tg.reward.mean(), atol=1e-8)


def test_bradley_terry_failure():
    # rock-paper-scissors: uniform pairs give a flat reward (predicts 1/2 where the truth is 0.8)
    rps = rock_paper_scissors(0.3)
    assert bt_fit(rps.P).abs().max() < 1e-9
    # skewed pairs: the RLHF policy collapses onto one response and is beaten with prob 0.8 by its counter,
    # while the regularised Nash equilibrium stays nearly unexploitable
    ref = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    r = bt_fit(rps.P, torch.outer(ref, ref))
    beta = 0.01
    pi_bt, pi_star = bt_policy(r, ref, beta), nash_equilibrium(rps.P, ref, beta)
    assert 1 - (rps.P @ pi_bt).max() < 0.21 and 1 - (rps.P @ pi_star).max() > 0.48
    assert duality_gap(pi_bt, rps.P, ref, beta) > 0.5
    # a random intransitive game: BT ranks a different response first and is beaten with probability > 0.9
    game = random_intransitive_game(K=6, seed=4)
    r = bt_fit(game.P, torch.outer(game.ref, game.ref))
    for beta in (0.1, 0.02):
        pi_bt, pi_star = bt_policy(r, game.ref, beta), nash_equilibrium(game.P, game.ref, beta)
        assert r.argmax() != pi_star.argmax()
        assert 1 - (game.P @ pi_bt).max() < 0.1 and 1 - (game.P @ pi_star).max() > 0.42
        # head-to-head against the regularised equilibrium stays near 1/2 either way
        assert abs(preference_payoff(pi_bt, pi_star, game.P) - 0.5) < 0.05
