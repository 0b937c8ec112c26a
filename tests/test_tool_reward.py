"""Tool-use reward design (chapter tool_reward): the reward's terms against a naive transcription, the reduction to
chapter agents' calculator, the mixed task, and one-line refusals."""
import random
import re

import pytest
import torch

import rlbook.agents  # noqa: F401  (registers the environment tasks)
from rlbook.agents import Calculator, ToolEnv, play_episodes
from rlbook.cli import main
from rlbook.models import RLBookError, load_policy
from rlbook.sft import task_warm_start
from rlbook.tasks import get_task
from rlbook.tool_reward import (MixedCalculator, RewardedTools, ToolChoiceTask, ToolReward, bare_number, best_calls,
                                choice_returns, tool_report)
from rlbook.train import read_metrics

ACTIONS = ["calc:{a}", "calc:{a}", "calc:12+", "calc:", "{s}", "{w}", "={s}", "{s} ", "the sum is {s}", "calc {a}"]


def naive_return(actions: list, a: str, s: str, terms: ToolReward, max_turns: int) -> tuple:  # (return, turns)
    "Read the episode off its actions: every call and whether the tool could answer it, then the answer."
    total, kept = 0.0, True
    for k, act in enumerate(actions[:max_turns]):
        if act.startswith("calc:"):
            good = act[5:] not in ("12+", "")
            kept &= good
            total += terms.call_bonus * good - terms.call_cost
            continue
        right = re.findall(r"\d+", act)[-1:] == [s]  # correctness reads the last number, leniently
        kept &= act.strip().lstrip("-").isdigit()
        return total + terms.correct * right + terms.format * kept, k + 1
    return total, max_turns


@pytest.mark.parametrize("terms", [ToolReward(), ToolReward(format=0.5, call_cost=0.2),
                                   ToolReward(correct=0.0, format=1.0, call_bonus=0.5, call_cost=1.5)])
def test_rewarded_tools_pay_each_term_as_a_naive_reading_of_the_episode_does(terms):
    rng = random.Random(0)
    for seed in range(300):
        env = RewardedTools(MixedCalculator(), terms)
        env.reset(seed)
        a, s = env.example.prompt[:-1], env.example.answer
        w = str(int(s) + 1)
        actions = [rng.choice(ACTIONS).format(a=a, s=s, w=w) for _ in range(5)]
        ret, done, k = 0.0, False, 0
        while not done and k < 4:
            _, r, done = env.step(actions[k])
            ret, k = ret + r, k + 1
        want, want_turns = naive_return(actions, a, s, terms, 4)
        assert k == want_turns and ret == pytest.approx(want), (actions, ret, want)
        assert env.solved == (done and re.findall(r"\d+", actions[k - 1])[-1:] == [s])


def test_the_default_reward_is_chapter_agents_calculator():
    model, tok = load_policy(str(task_warm_start("calculator")))
    seeds = list(range(40))
    rows = [play_episodes(model, tok, envs, seeds, max_turns=3, max_new_tokens=24, temperature=0.0)
            for envs in ([Calculator() for _ in seeds], [RewardedTools(Calculator(), ToolReward()) for _ in seeds])]
    assert rows[0].completions == rows[1].completions
    assert torch.equal(rows[0].reward, rows[1].reward) and torch.equal(rows[0].turn_reward, rows[1].turn_reward)
    assert rows[0].reward.sum() > 0, "some episodes are solved, so the comparison has something to compare"


def test_mixed_calculator_mixes_one_digit_and_long_sums():
    envs = [MixedCalculator(easy_rate=0.3) for _ in range(2000)]
    for seed, env in enumerate(envs):
        env.reset(seed)
        a, b = map(int, env.example.prompt[:-1].split("+"))
        assert env.answer == str(a + b)
        assert (a < 10 and b < 10) if env.easy else (1000 <= a < 100000 and 1000 <= b < 100000)
    assert abs(sum(env.easy for env in envs) / 2000 - 0.3) < 0.04
    again = MixedCalculator(easy_rate=0.3)
    assert again.reset(7) == MixedCalculator(easy_rate=0.3).reset(7), "the same seed, the same problem"


def test_the_teacher_calls_twice_now_and_then_and_its_episodes_play_back():
    task = ToolChoiceTask(recheck_rate=0.25)
    demos = {seed: task.demonstration(seed) for seed in range(3000)}
    calls = [d.count("calc:") for d in demos.values()]
    assert set(calls) == {0, 1, 2}
    assert abs(sum(c == 2 for c in calls) / sum(c > 0 for c in calls) - 0.25) < 0.05
    for seed, demo in list(demos.items())[:300]:  # every demonstration is an episode the environment accepts, and solved
        env = task.make_env()
        env.reset(seed)
        turns = demo.split(task.eos_text)
        actions = [turns[0]] + [t.split("\n", 1)[1] for t in turns[1:]]
        for act in actions[:-1]:
            assert env.step(act)[2] is False
        assert env.step(actions[-1])[2] and env.solved and env.kept


def test_bare_number():
    assert bare_number("123") and bare_number(" -4\n") and not bare_number("=12") and not bare_number("12 apples")
    assert not bare_number("")


@pytest.mark.parametrize("make, needle", [
    (lambda: ToolReward(call_cost=float("nan")), "call_cost"),
    (lambda: ToolReward(format=True), "format"),
    (lambda: RewardedTools(MixedCalculator(), {"correct": 1}), "ToolReward"),
    (lambda: RewardedTools(object(), ToolReward()), "ToolEnv"),
    (lambda: ToolChoiceTask(easy_rate=1.5), "easy_rate"),
    (lambda: ToolChoiceTask(tool_reward=0.2), "tool_reward"),
    (lambda: ToolChoiceTask(recheck_rate=-0.1), "recheck_rate"),
    (lambda: get_task("calculator_mix", tool_rate=-1), "tool_rate"),
])
def test_bad_reward_settings_get_a_one_line_error(make, needle):
    with pytest.raises(RLBookError) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_rewarded_tools_is_a_tool_env_wrapper_for_any_tool_env():
    class Echo(ToolEnv):  # a toy: the answer is right if it repeats the secret the tool tells
        def reset(self, seed):
            self.answer, self.calls, self.well_formed, self.solved = str(seed * 7), 0, 0, False
            return f"secret #{seed}? "

        def answer_reward(self, answer):
            return float(answer.strip() == self.answer)

    env = RewardedTools(Echo({"ask": lambda q: str(int(q) * 7) if q.isdigit() else "error"}), ToolReward(call_cost=0.25))
    assert env.reset(3) == "secret #3? " and env.answer == "21"
    assert env.step("ask:3") == ("=21\n", -0.25, False)
    assert env.step("21") == ("", 1.0, True) and env.solved and env.calls == 1


def test_tool_report_counts_calls_and_accuracy_by_kind():
    task = get_task("calculator_mix")
    model, tok = load_policy(str(task_warm_start("calculator_mix")))
    r = tool_report(model, tok, task.with_tokenizer(tok), n=60)
    assert set(r) >= {"easy_accuracy", "hard_accuracy", "easy_calls", "hard_calls", "well_formed", "truncated"}
    assert r["easy_accuracy"] > r["hard_accuracy"], "the warm start adds one-digit numbers alone, not long ones"
    assert 0 <= r["easy_calls"] <= task.max_turns and 0 <= r["hard_calls"] <= task.max_turns


def test_calculator_mix_trains_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "grpo", "--task", "calculator_mix", "--model", "tiny-sft", "--steps", "2", "--batch-size", "32",
                 "--max-new-tokens", "24", "--eval-n", "20", "--no-progress", "--out", str(out)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["turns/total"] >= 32 and 1 <= rows[0]["turns/mean"] <= 3


def test_calculator_mix_cost_is_calculator_mix_with_the_cost_reward():
    task, base = get_task("calculator_mix_cost"), get_task("calculator_mix")
    assert task.tool_reward == ToolReward(call_cost=0.2) and base.tool_reward == ToolReward()
    assert get_task("calculator_mix_cost", easy_rate=0.3).easy_rate == 0.3  # its knobs are calculator_mix's
    assert get_task("calculator_mix_cost", tool_reward=ToolReward(call_cost=0.1)).tool_reward.call_cost == 0.1
    ex, ex_base = task.sample(8, seed=3, split="test"), base.sample(8, seed=3, split="test")
    assert [e.prompt for e in ex] == [e.prompt for e in ex_base]  # the same problems, the same held-out split
    env = task.make_env()
    env.reset(5)
    _, r, _ = env.step(f"calc:{env.example.prompt[:-1]}")  # a call is charged 0.2
    assert r == pytest.approx(-0.2)
    from rlbook.sft import TASK_WARM_STARTS
    assert TASK_WARM_STARTS["calculator_mix_cost"] is TASK_WARM_STARTS["calculator_mix"]


def played_return(terms: ToolReward, calls: int, right: bool, max_turns: int = 4) -> float:  # one scripted episode
    env = RewardedTools(MixedCalculator(), terms)
    env.reset(11)
    a, s = env.example.prompt[:-1], env.answer
    actions = [f"calc:{a}"] * calls + [s if right else str(int(s) + 1)]
    total = 0.0
    for act in actions[:max_turns]:
        _, r, done = env.step(act)
        total += r
        if done:
            break
    return total


@pytest.mark.parametrize("terms", [ToolReward(), ToolReward(call_cost=0.2), ToolReward(format=0.5, call_cost=0.2),
                                   ToolReward(call_bonus=0.5), ToolReward(correct=0.0, format=1.0, call_cost=0.2),
                                   ToolReward(correct=2.0, format=0.3, call_bonus=0.7, call_cost=0.1)])
def test_choice_returns_are_the_environments_expected_returns(terms):
    rng = random.Random(1)
    for _ in range(10):
        p0, p1 = rng.random(), rng.random()
        want = [(p1 if j else p0) * played_return(terms, j, True) + (1 - (p1 if j else p0)) * played_return(terms, j, False)
                for j in range(4)] + [played_return(terms, 4, True)]
        got = choice_returns(p0, p1, terms, 4)
        assert got == pytest.approx(want)
        best = best_calls(p0, p1, terms, 4)
        assert got[best] == max(got) and all(got[j] < got[best] for j in range(best))


@pytest.mark.parametrize("terms, easy, hard", [
    (ToolReward(call_cost=0.2), 0, 1),  # a call where it adds more than it costs
    (ToolReward(call_bonus=0.5), 3, 3),  # padded to the last turn that still answers
    (ToolReward(call_bonus=2.0), 4, 4),  # cut off: the calls pay more than the answer
    (ToolReward(call_cost=1.5), 0, 0),  # never
    (ToolReward(correct=0.0, format=1.0, call_cost=0.2), 0, 0),  # answers alone whatever they are worth
])
def test_best_calls_predicts_each_failure(terms, easy, hard):
    assert best_calls(0.99, 0.97, terms, 4) == easy and best_calls(0.01, 0.97, terms, 4) == hard


# ---------------------------------------------------------------- the chapter's exercise, solved
def cost_window(p_easy_alone, p_easy_tool, p_hard_alone, p_hard_tool, correct=1.0):
    "Positive costs strictly inside: the call pays on the long sum and not on the one-digit one."
    return max(0.0, correct * (p_easy_tool - p_easy_alone)), correct * (p_hard_tool - p_hard_alone)


def test_cost_window_solution():
    rng = random.Random(5)
    for _ in range(300):
        p, w = [rng.random() for _ in range(4)], rng.choice([0.5, 1.0, 2.0])
        low, high = cost_window(*p, correct=w)
        for cost in [rng.uniform(-1, 3) for _ in range(20)]:
            terms = ToolReward(correct=w, call_cost=cost)
            inside = best_calls(p[0], p[1], terms, 4) == 0 and best_calls(p[2], p[3], terms, 4) == 1
            if min(abs(cost - low), abs(cost - high)) > 1e-9:
                assert inside == (low < cost < high)
