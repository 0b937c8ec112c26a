"""Tests of the explorers (rlbook.explore, chapter 97): each figure read back against the chapter's own functions,
each explorer's sliders moved in Python. tests/test_widgets_live.py moves them once more in a browser."""
import math

import ipywidgets
import matplotlib.pyplot as plt
import pytest
import torch

from rlbook.explore import (explore_dpo_loss, explore_kl_optimum, explore_ppo_clip, explore_preference_game,
                            plot_dpo_loss, plot_kl_optimum, plot_ppo_clip, plot_preference_game)
from rlbook.objective import categorical_kl, optimal_policy
from rlbook.preferences import bt_fit, bt_policy, duality_gap, preference_payoff, random_intransitive_game


def toy(seed=0, n=4, K=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g, dtype=torch.float64), torch.rand(n, K, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- the explorer of pi* as beta moves
def test_plot_kl_optimum_draws_the_optimal_policy():
    ref, r = toy(7, 1, 4)
    ref, r = ref[0], r[0]
    for beta in (0.0, 0.2, 5.0):
        fig = plot_kl_optimum(beta, ref, r)
        ax, ax_r = fig.axes
        bars_ref, bars_opt = (torch.tensor([b.get_height() for b in c], dtype=torch.float64) for c in ax.containers)
        assert torch.allclose(bars_ref, ref.softmax(-1))
        assert torch.allclose(bars_opt, optimal_policy(ref, r, beta).exp())
        assert torch.allclose(torch.tensor([b.get_height() for b in ax_r.containers[0]], dtype=torch.float64), r)
        assert abs(ax_r.lines[0].get_ydata()[0] - (bars_opt * r).sum().item()) < 1e-9  # E_pi*[r]
        plt.close(fig)
    fig = plot_kl_optimum(0.0, ref, r)  # beta = 0: all mass on the best completion
    assert [b.get_height() for b in fig.axes[0].containers[1]][r.argmax().item()] == pytest.approx(1.0)
    plt.close(fig)


def test_explore_kl_optimum_slider_and_rerender():
    ref, r = toy(8, 1, 6)
    w = explore_kl_optimum(ref[0], r[0])
    s = w.children[0]
    assert isinstance(s, ipywidgets.FloatLogSlider) and (s.base, s.min, s.max, s.value) == (10, -2, 1, 0.3)
    kls = []
    for beta in (10.0, 1.0, 0.1, 0.01):
        s.value = beta
        assert w.result["beta"] == beta
        assert w.result["kl/ref"] == pytest.approx(categorical_kl(optimal_policy(ref[0], r[0], beta), ref[0]).item())
        kls.append(w.result["kl/ref"])
    assert all(b > a for a, b in zip(kls, kls[1:]))  # smaller beta, further from the reference


# ---------------------------------------------------------------- the explorer of the clipped surrogate
def test_plot_ppo_clip_draws_eq_ppo_clip_and_its_gradient():
    for eps, a, c in ((0.2, 1.0, 0.0), (0.3, -0.7, 0.0), (0.1, -1.0, 2.0)):
        fig = plot_ppo_clip(eps, a, c)
        ax_l, ax_g = fig.axes
        line = next(ln for ln in ax_l.lines if ln.get_label() == "clipped ℓ(ρ)")
        rho, obj, grad = line.get_xdata(), line.get_ydata(), ax_g.lines[-1].get_ydata()
        assert rho.max() >= c + 1.0 - 1e-9  # the dual-clip cut is on the plot
        for i in range(0, len(rho), 10):
            x = float(rho[i])
            want = min(x * a, min(max(x, 1 - eps), 1 + eps) * a)
            if c and a < 0:
                want = max(want, c * a)
            assert obj[i] == pytest.approx(want, abs=1e-9)
            if min(abs(x - k) for k in (1 - eps, 1 + eps, c)) > 0.02:
                flat = (a > 0 and x > 1 + eps) or (a < 0 and x < 1 - eps) or (c and a < 0 and x > c)
                assert grad[i] == pytest.approx(0.0 if flat else a, abs=1e-9)
        plt.close(fig)


def test_explore_ppo_clip_sliders_and_rerender():
    w = explore_ppo_clip()
    eps, adv, dual = w.children[:3]
    assert (eps.min, eps.max, adv.min, adv.max) == (0.05, 0.5, -2.0, 2.0)
    assert isinstance(dual, ipywidgets.Dropdown) and set(dict(dual.options).values()) == {0.0, 2.0, 3.0}
    eps.value = 0.4
    assert w.result["clip_eps"] == 0.4 and w.result["zero_grad"][0][0] == pytest.approx(1.4, abs=0.01)
    adv.value = 0.0  # A = 0: the surrogate is flat, the gradient is zero everywhere
    assert len(w.result["zero_grad"]) == 1 and w.result["zero_grad"][0][1] - w.result["zero_grad"][0][0] > 2.4


# ---------------------------------------------------------------- the explorer of the preference game
def test_plot_preference_game_draws_bt_and_nash():
    game = random_intransitive_game(K=4, seed=2)
    fig = plot_preference_game(game.P, game.ref, 0.2)
    ax_p, ax_r, ax_pi = fig.axes
    assert torch.allclose(torch.as_tensor(ax_p.images[0].get_array().data, dtype=torch.float64), game.P)
    r_hat = bt_fit(game.P, torch.outer(game.ref, game.ref))
    assert torch.allclose(torch.tensor([b.get_height() for b in ax_r.containers[0]], dtype=torch.float64), r_hat)
    ref_b, top_b, bt_b, nash_b = (torch.tensor([b.get_height() for b in c], dtype=torch.float64) for c in ax_pi.containers)
    assert torch.allclose(ref_b, game.ref) and top_b[r_hat.argmax()] == 1 and top_b.sum() == 1
    assert torch.allclose(bt_b, bt_policy(r_hat, game.ref, 0.2))
    assert duality_gap(nash_b, game.P, game.ref, 0.2) < 1e-7
    plt.close(fig)


def test_explore_preference_game_sliders_and_rerender():
    w = explore_preference_game(ref=(1 / 3, 1 / 3, 1 / 3))
    ab, bc, ac, beta = w.children[:4]
    assert [s.description for s in (ab, bc, ac)] == ["P(a≻b)", "P(b≻c)", "P(a≻c)"]
    assert all((s.min, s.max) == (0.02, 0.98) for s in (ab, bc, ac))
    assert isinstance(beta, ipywidgets.FloatLogSlider) and (beta.min, beta.max) == (-2, 0)
    # uniform reference on rock-paper-scissors: the BT fit is flat and the equilibrium is uniform
    assert w.result["r_hat"].abs().max() < 1e-9 and torch.allclose(w.result["pi_nash"], torch.full((3,), 1 / 3, dtype=torch.float64))
    bc.value = 0.3  # now c beats b and a: c is a Condorcet winner
    P = w.result["P"]
    assert torch.allclose(P + P.T, torch.ones(3, 3, dtype=torch.float64)) and P[1, 2] == 0.3
    assert w.result["pi_nash"].argmax() == 2 and w.result["r_hat"].argmax() == 2
    assert w.result["win/bt_vs_nash"] == pytest.approx(preference_payoff(w.result["pi_bt"], w.result["pi_nash"], P).item())


# ---------------------------------------------------------------- the explorer of the DPO loss
def test_plot_dpo_loss_draws_eq_dpo_loss_and_grad():
    for beta, c, r in ((0.05, 1.0, -1.0), (0.5, -2.0, 3.0)):
        fig = plot_dpo_loss(beta, c, r)
        ax_l, ax_w, ax_r = fig.axes
        h, loss, weight = ax_l.lines[0].get_xdata(), ax_l.lines[0].get_ydata(), ax_w.lines[0].get_ydata()
        for i in range(0, len(h), 20):
            assert loss[i] == pytest.approx(math.log1p(math.exp(-beta * h[i])), abs=1e-9)
            assert weight[i] == pytest.approx(beta / (1 + math.exp(beta * h[i])), abs=1e-12)
        assert ax_l.lines[1].get_xdata()[0] == pytest.approx(c - r)
        heights = [b.get_height() for b in ax_r.containers[0]]
        assert heights == pytest.approx([beta * c, beta * r])
        plt.close(fig)


def test_explore_dpo_loss_sliders_and_rerender():
    w = explore_dpo_loss()
    beta, c, r = w.children[:3]
    assert isinstance(beta, ipywidgets.FloatLogSlider) and (beta.base, beta.min, beta.max) == (10, -2, 0)
    assert (c.min, c.max, r.min, r.max) == (-10, 10, -10, 10)
    c.value, r.value = -4.0, 4.0  # a wrong-way pair: negative margin, loss above log 2
    assert w.result["margin"] == -8.0 and w.result["loss"] > math.log(2)
    assert w.result["loss"] == pytest.approx(math.log1p(math.exp(0.1 * 8.0)))
