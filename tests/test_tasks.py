"Behaviour tests of rlbook.tasks: determinism, splits, answer checking, Countdown safety, oracles, get_task."
import math
import random

import pytest
import torch

from rlbook.models import RLBookError
from rlbook.tasks import (
    GSM8K,
    TASKS,
    Addition,
    BradleyTerryOracle,
    Countdown,
    CyclicOracle,
    Example,
    Multiplication,
    Reverse,
    Sentiment,
    Sort,
    answers_match,
    evaluate_expression,
    extract_answer,
    get_task,
    parse_gsm8k_answer,
    preference_matrix,
    split_of,
)

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
               "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    {"question": "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
                 "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
                 "How much more money does Betty need to buy the wallet?",
     "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
               "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
               "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"},
]

PROCEDURAL = [Addition(), Multiplication(), Countdown(), Reverse(), Sort(), Addition(1, 1), Countdown(n_numbers=4)]


def wrong_completion(task, example):
    "A completion that must score 0."
    if isinstance(task, Countdown):
        return example.answer + "+0"  # the bare target, plus a literal that was not given
    if isinstance(task, (Reverse, Sort)):
        return example.answer + "x"
    return str(int(example.answer) + 1)


@pytest.mark.parametrize("task", PROCEDURAL, ids=lambda t: repr(t))
def test_deterministic_and_seed_dependent(task):
    for split in ["train", "test"]:
        a = task.sample(100, seed=3, split=split)
        assert a == task.sample(100, seed=3, split=split)
        assert a[:10] == task.sample(10, seed=3, split=split)
        assert a != task.sample(100, seed=4, split=split)


@pytest.mark.parametrize("task", PROCEDURAL, ids=lambda t: repr(t))
def test_splits_disjoint(task):
    train = {e.prompt for seed in range(3) for e in task.sample(300, seed=seed)}
    test = {e.prompt for seed in range(3) for e in task.sample(100, seed=seed, split="test")}
    assert train and test and not train & test
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "test" for p in test)


@pytest.mark.parametrize("task", PROCEDURAL + [GSM8K(rows={"train": GSM8K_ROWS, "test": GSM8K_ROWS})],
                         ids=lambda t: type(t).__name__)
def test_solution_scores_one_and_wrong_answer_zero(task):
    examples = task.sample(200, seed=0) + task.sample(200, seed=0, split="test")
    assert all(e.prompt.isascii() and e.prompt.isprintable() for e in examples)
    sols = task.rewards(examples, [e.solution for e in examples])
    assert sols == [1.0] * len(examples)
    assert task.rewards(examples, [wrong_completion(task, e) for e in examples]) == [0.0] * len(examples)


def test_split_and_n_errors():
    with pytest.raises(RLBookError, match="split"):
        Addition().sample(2, seed=0, split="validation")
    with pytest.raises(RLBookError):
        Addition().sample(-1, seed=0)
    with pytest.raises(RLBookError):
        Addition().rewards([Example("1+1=", "2", "2")], [])
    assert Addition().sample(0, seed=0) == []


@pytest.mark.parametrize("text, expected", [
    ("479", "479"), (" 479 ", "479"), ("479.", "479"), ("479.0", "479.0"), ("0479", "0479"), ("1,234", "1234"),
    ("-12", "-12"), ("x = -12", "-12"), ("3-2", "2"), ("$1,234.50", "1234.50"), ("The answer is 479", "479"),
    ("So the answer: 479!", "479"), ("\\boxed{479}", "479"), ("\\boxed{1,234}.", "1234"), ("#### 479", "479"),
    ("479<garbage>", "479"), ("12 + 5 = 17, so the answer is 479. Check: 480", "479"),
    ("Step 1: 2+3=5\nStep 2: 5*4=20", "20"), ("479\n12+3=15", "15"), ("\\boxed{x}, 7", "7"),
    ("", None), ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, ok", [
    ("479", True), (" 479 ", True), ("479.", True), ("479.0", True), ("0479", True), ("The answer is 479", True),
    ("\\boxed{479}", True), ("#### 479", True), ("479<garbage>", True), ("478", False), ("4790", False),
    ("479.5", False), ("", False), ("479\n1+1=2", False),
])
def test_numeric_checking(completion, ok):
    assert Addition().is_correct(Example("23+456=", "479", "479"), completion) is ok
    assert answers_match(extract_answer(completion), "479") is ok


def test_gsm8k_parsing_and_checking():
    assert [parse_gsm8k_answer(r["answer"]) for r in GSM8K_ROWS] == ["72", "10", "5"]
    assert parse_gsm8k_answer("so 1,600 in total.\n#### 1,600") == "1600"
    with pytest.raises(RLBookError):
        parse_gsm8k_answer("72")
    task = GSM8K(rows={"train": GSM8K_ROWS, "test": GSM8K_ROWS[:1]})
    examples = task.sample(3, seed=0)
    assert sorted(dict(e.meta)["index"] for e in examples) == [0, 1, 2]
    for e in examples:
        assert "<<" not in e.solution and e.solution.rstrip().endswith("#### " + e.answer)
        assert task.reward(e, f"Let me compute. The answer is {e.answer}.") == 1.0
        assert task.reward(e, f"so the total is \\boxed{{{e.answer}}}") == 1.0
        assert task.reward(e, f"#### {int(e.answer) + 1}") == 0.0


def test_gsm8k_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    task = get_task("gsm8k")  # constructing loads nothing
    with pytest.raises(RLBookError, match="network"):
        task.sample(1, seed=0)


@pytest.mark.parametrize("completion", [
    "__import__('os').system('echo hacked')", "exec('1')", "3**5", "10**10**10", "0x16", "1_6", "True+1", "-3+5+7",
    "5/0", "3*5+7=22", "(" * 500 + ")" * 500, "9" * 1000, "3 5 7", "", "3+", "07", "1e3", "3.5", "3//2", "3*5+7\n0",
    "lambda: 0", "[3, 5, 7]", "3*5+7+0", "3*5+7*1", "22",
])
def test_countdown_safety(completion):
    example = Example(prompt="3 5 7 -> 22:", answer="22", solution="3*5+7")
    assert Countdown().reward(example, completion) == 0.0
    assert Countdown(use_all=False).reward(example, completion) == 0.0


def test_countdown_rules():
    e = Example(prompt="3 5 7 -> 15:", answer="15", solution="3+5+7")
    assert evaluate_expression("3*5*7/7") == 15 and evaluate_expression("7/2*4") == 14
    assert Countdown().reward(e, "3+5+7") == 1.0 and Countdown().reward(e, "<answer> 7+(5+3) </answer>") == 1.0
    assert Countdown().reward(e, "3*5*7/7") == 0.0  # 7 used twice
    assert Countdown().reward(e, "3*5") == 0.0  # must use every number
    assert Countdown(use_all=False).reward(e, "3*5") == 1.0
    assert Countdown(use_all=False).reward(e, "3*5*5/5") == 0.0  # 5 used twice
    assert Countdown.parse_prompt("10 2 7 -> 27:") == ([10, 2, 7], 27)


def test_sentiment():
    task = Sentiment()
    e = task.sample(1, seed=0)[0]
    assert e.prompt in task.prompts and e.answer == ""
    assert task.reward(e, " wonderful and moving.") > 0.5 > -0.2 > task.reward(e, " a complete waste of time.")
    assert Sentiment(target="negative").reward(e, " terrible.") > 0
    assert task.reward(e, "") == 0.0 and -1 <= task.reward(e, " great!!! " * 20) <= 1
    assert task.is_correct(e, " brilliant.") and not task.is_correct(e, " boring.")
    test_prompts = {x.prompt for x in task.sample(100, seed=0, split="test")}
    assert test_prompts and not test_prompts & {x.prompt for x in task.sample(300, seed=0)}


def test_bradley_terry_oracle():
    bt = BradleyTerryOracle(lambda prompt, y: float(len(y)), beta=2.0)
    for a, b in [("", "x"), ("xxx", "x"), ("ab", "cd")]:
        assert math.isclose(bt.prob("p", a, b), 1 / (1 + math.exp(-(len(a) - len(b)) / 2.0)))
        assert math.isclose(bt.prob("p", a, b) + bt.prob("p", b, a), 1.0)
    gen = torch.Generator().manual_seed(0)
    p = bt.prob("p", "xxx", "x")
    freq = sum(bt.compare("p", "xxx", "x", gen) for _ in range(20_000)) / 20_000
    assert abs(freq - p) < 0.015
    noisy = BradleyTerryOracle(lambda prompt, y: 100.0 * len(y), label_noise=0.2)
    assert math.isclose(noisy.prob("p", "xx", "x"), 0.8)
    rng = random.Random(0)
    freq = sum(noisy.compare("p", "xx", "x", rng) for _ in range(20_000)) / 20_000
    assert abs(freq - 0.8) < 0.015
    for kwargs in [dict(beta=0.0), dict(beta=-1.0), dict(label_noise=0.51)]:
        with pytest.raises(RLBookError):
            BradleyTerryOracle(lambda prompt, y: 0.0, **kwargs)


def test_cyclic_oracle_is_intransitive():
    cyc = CyclicOracle(strength=0.25)
    a, b, c = "xxx", "x", "xx"  # classes 0, 1, 2
    assert cyc.prob("p", a, b) > 0.5 and cyc.prob("p", b, c) > 0.5 and cyc.prob("p", c, a) > 0.5
    P = preference_matrix(cyc, "p", [a, b, c], dtype=torch.float64)
    assert torch.allclose((P - 0.5) @ torch.full((3,), 1 / 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RLBookError):
        CyclicOracle(strength=0.6)


@pytest.mark.parametrize("oracle", [BradleyTerryOracle(lambda p, y: y.count("a") - 0.3 * len(y), label_noise=0.1),
                                    CyclicOracle()], ids=["bt", "cyclic"])
def test_preference_matrix_antisymmetric(oracle):
    ys = ["", "a", "ab", "aab", "bbbb", "aaaaa"]
    P = preference_matrix(oracle, "p", ys)
    assert P.shape == (6, 6) and P.dtype == torch.float32
    assert torch.allclose(P + P.T, torch.ones(6, 6))
    assert torch.allclose(P - 0.5, -(P - 0.5).T) and torch.all(torch.diagonal(P) == 0.5)
    assert ((P >= 0) & (P <= 1)).all()


def test_get_task():
    built_in = {"addition", "addition_fewshot", "multiplication", "countdown", "reverse", "sort", "gsm8k", "sentiment"}
    import rlbook.cli  # noqa: F401  imports every chapter; chapters 05, 11, 41, 70, 80 and 82 register their tasks on import
    assert set(TASKS) == built_in | {"arith_chain", "addition_sloppy", "addition_offset", "chat_addition",
                                     "guess_number", "calculator", "lock", "calculator_mix",
                                     "calculator_mix_cost"}
    assert get_task("multiplication", max_digits=3) == Multiplication(max_digits=3)
    with pytest.raises(RLBookError, match="valid names: addition, addition_fewshot, addition_offset, addition_sloppy, arith_chain, calculator, calculator_mix, calculator_mix_cost, chat_addition, countdown"):
        get_task("subtraction")
    with pytest.raises(RLBookError, match="bad arguments"):
        get_task("addition", digits=3)
    for name, kwargs in [("addition", dict(min_digits=0)), ("addition", dict(min_digits=4, max_digits=3)),
                         ("multiplication", dict(min_digits=0)), ("countdown", dict(n_numbers=0)),
                         ("countdown", dict(max_number=0)), ("countdown", dict(ops="%")),
                         ("reverse", dict(min_len=0)), ("sort", dict(min_len=3, max_len=2)),
                         ("sentiment", dict(target="neutral"))]:
        with pytest.raises(RLBookError):
            get_task(name, **kwargs)


def test_checked_reward_accepts_real_numbers_only():
    "bool, int, float, numpy scalars and one-element real tensors are rewards; anything else is one clear line."
    import numpy as np

    from rlbook.tasks import Example, Task, checked_reward

    class Fixed(Task):
        def __init__(self, value):
            self.value = value

        def reward(self, example, completion):
            return self.value

    ex = Example(prompt="2+2=", answer="4", solution="4")
    for value, want in [(False, 0.0), (2, 2.0), (0.5, 0.5), (np.float16(0.5), 0.5), (np.int8(-1), -1.0),
                        (torch.tensor(0.25, dtype=torch.float64), 0.25), (torch.tensor([[3]]), 3.0)]:
        got = checked_reward(Fixed(value), ex, "4")
        assert type(got) is float and got == want
    for value in ["1.0", None, [1.0], (1.0,), torch.zeros(2), np.array([1.0, 2.0]), 1j, math.nan, math.inf,
                  torch.tensor(float("nan")), np.float64("nan")]:
        with pytest.raises(RLBookError, match=r"on prompt '2\+2=' with completion '4'") as err:
            checked_reward(Fixed(value), ex, "4")
        assert "\n" not in str(err.value)
