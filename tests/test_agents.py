"""Environments as tasks (chapter agents) through the command line and the Python API."""
import json

import pytest
import torch

from rlbook.agents import (EnvTask, GuessNumber, TextEnv, ToolEnv, consistent_interval, lock_turns, play_episodes,
                           search_turns)
from rlbook.cli import main
from rlbook.grpo import GRPO, GRPOConfig
from rlbook.models import RLBookError, load_policy
from rlbook.tasks import get_task
from rlbook.train import read_metrics, train


def test_train_and_eval_an_environment_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "grpo", "--task", "guess_number", "--model", "tiny-sft", "--steps", "2", "--batch-size", "32",
                 "--max-new-tokens", "4", "--eval-n", "20", "--beta", "0", "--no-progress", "--out", str(out)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert 1 <= rows[0]["turns/mean"] <= 10 and 0 <= rows[0]["frac_solved"] <= 1 and "eval/turns" in rows[0]
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "checkpoint" / "model"), "--task", "guess_number", "--max-new-tokens", "4",
                 "--n", "20"]) == 0
    text = capsys.readouterr().out
    res = json.loads(text[: text.rindex("}") + 1])
    assert 1 <= res["turns"] <= 10 and "episodes solved" in text


@pytest.mark.parametrize("method", ["dapo", "ppo", "dpo", "remax"])
def test_methods_that_cannot_play_episodes_refuse_in_one_line(method, tmp_path, capsys):
    assert main(["train", method, "--task", "guess_number", "--model", "tiny", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "environment" in err[0], err


class Digits(TextEnv):
    "Three turns; each is rewarded by the fraction of digits in the action; solved when every action is all digits."
    def reset(self, seed):
        self.turn, self.all_digits = 0, True
        return "digits:"

    def step(self, action):
        self.turn += 1
        share = sum(c.isdigit() for c in action) / max(len(action), 1)
        self.all_digits &= bool(action) and share == 1
        self.solved = self.turn == 3 and self.all_digits
        return "ok", share, self.turn == 3


def test_a_user_environment_learns_through_the_api(tmp_path):
    "GRPO over episodes of an environment defined here, from the random tiny model: the solved rate goes from ~0 to > 0.5."
    cfg = GRPO.config(model="tiny", task="addition", steps=30, batch_size=64, group_size=8, lr=3e-3, max_new_tokens=2,
                      eval_every=0, eval_n=64, out=str(tmp_path / "run"), progress=False, seed=0)
    run = train(cfg, GRPO, options=GRPOConfig(beta=0.0), task=EnvTask(env=Digits, max_turns=5))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["eval/accuracy"] < 0.05 and rows[-1]["eval/accuracy"] > 0.5, (rows[0], rows[-1])
    assert rows[-1]["eval/turns"] == 3 and run.task.max_turns == 5


def test_guess_number_replies_and_the_consistent_interval():
    env = GuessNumber(64, max_turns=10)
    env.reset(3)
    env.secret = 40
    assert env.step("20") == ("+", 0.0, False) and env.step("50") == ("-", 0.0, False)
    assert env.step("x") == ("?", 0.0, False) and env.step("40") == ("", (10 + 1 - 4) / 10, True) and env.solved
    assert consistent_interval(64, [(20, "+"), (50, "-"), (45, "-")]) == (21, 44)
    assert search_turns(1) == 1 and search_turns(3) == pytest.approx(5 / 3) and search_turns(64, 0.0) > search_turns(64, 0.5) > 5.125


def test_an_episode_is_cut_at_max_turns_and_at_the_context():
    policy, tok = load_policy("tiny", device="cpu", seed=0)
    ro = play_episodes(policy, tok, [GuessNumber(64, max_turns=3) for _ in range(4)], [0, 1, 2, 3], max_turns=3,
                       max_new_tokens=2, generator=torch.Generator().manual_seed(0))
    assert (ro.turns <= 3).all() and (ro.truncated == ~ro.solved).all()
    ro = play_episodes(policy, tok, [GuessNumber(64, max_turns=60) for _ in range(3)], [0, 1, 2], max_turns=60,
                       max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert ro.truncated.all() and (ro.turns < 60).all(), "cut where the context is full, well before max_turns"
    assert ro.prompt_ids.shape[1] + ro.completion_ids.shape[1] <= 128, "the training pass can score every token"
    assert ro.completion_mask.sum() > 0 and torch.equal(ro.turn_reward.sum(-1), ro.reward)

    class Wordy(GuessNumber):  # a first observation longer than the context
        def reset(self, seed):
            super().reset(seed)
            return "guess " * 200
    with pytest.raises(RLBookError, match="first observation of .* context of 128"):
        play_episodes(policy, tok, [Wordy(64)], [0], max_turns=3, max_new_tokens=2)


# ---------------------------------------------------------------- the chapter's exercise, solved
def halving_guess(n: int, history: list) -> int:
    "Binary search's next guess: the middle of the interval the replies still allow."
    lo, hi = consistent_interval(n, history)
    return (lo + hi) // 2


def test_halving_guess_solution():
    for secret in (1, 17, 64):
        env, history = GuessNumber(64, max_turns=100), []
        env.reset(0)
        env.secret = secret
        for _ in range(7):
            guess = halving_guess(64, history)
            obs, _, done = env.step(str(guess))
            if done:
                break
            history.append((guess, obs))
        assert done


@pytest.mark.parametrize("name, knobs, needle", [
    ("guess_number", dict(n=1), "n must be an integer in [2, 999]"),
    ("guess_number", dict(max_turns=0), "max_turns must be a positive integer"),
    ("calculator", dict(tool_rate=1.5), "tool_rate must be a probability"),
    ("calculator", dict(min_digits=5, max_digits=3), "digits"),
    ("lock", dict(length=9), "length must be an integer in [1, 4]"),
])
def test_environment_knobs_are_checked(name, knobs, needle):
    with pytest.raises(RLBookError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        get_task(name, **knobs)


class Shout(ToolEnv):
    "A user's tool environment: the tool `up` upper-cases its argument; the answer must be the prompt's word in capitals."
    def reset(self, seed):
        self.word = ["ab", "cd", "ef"][seed % 3]
        return f"{self.word}:"

    def answer_reward(self, answer):
        return float(answer.strip() == self.word.upper())


def test_a_tool_environment_of_ones_own():
    env = Shout({"up": str.upper})
    env.reset(1)
    assert env.step("up:cd") == ("=CD\n", 0.0, False) and env.step("nope:cd")[2] and not env.solved
    env = Shout({"up": str.upper})  # EnvTask builds a fresh environment for every episode
    env.reset(1)
    assert env.step("CD") == ("", 1.0, True) and env.solved and env.calls == 0
    assert lock_turns(1, 2, 1.0) == 1.5 and lock_turns(1, 2, 0.0) == pytest.approx(2.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_episodes_on_rope_models_match_the_training_pass(arch):
    "The KV cache kept across turns, with holes, on RoPE models (the architectures of SmolLM2 and Qwen2.5)."
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from rlbook.logprobs import completion_logprobs
    from rlbook.models import CHAR_VOCAB, build_char_tokenizer

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=len(CHAR_VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()
    eos_bias = torch.zeros(len(CHAR_VOCAB))
    eos_bias[1] = 3.0  # EOS about one token in six: turns end at different tokens and leave holes
    model.lm_head.register_forward_hook(lambda module, args, out: out + eos_bias)
    tok = build_char_tokenizer(model_max_length=256)
    task = EnvTask(env=lambda: GuessNumber(64, max_turns=4), max_turns=4)
    ro = task.episodes(model, tok, task.sample(6, seed=0), group_size=2, max_new_tokens=3,
                       generator=torch.Generator().manual_seed(0))
    mine = ro.completion_mask.bool()
    assert (ro.completion_attention == 0).any() and (ro.turns > 1).any()  # holes (turns ended by EOS), several turns
    train = completion_logprobs(model, ro.input_ids, ro.attention_mask, mine.shape[1])["logp"] * mine
    assert torch.allclose(train, ro.logp, atol=1e-5), (train - ro.logp).abs().max()
