"""The bad-input corpus: every user mistake gets one clear line, exit status 2, and nothing on disk.

Command-line cases run in-process through `rlbook.cli.main(argv)` (a few through a real
`python -m rlbook.cli` subprocess); Python API cases assert one `RLBookError` with a one-line
message. Every check runs before a model is built, so each case takes milliseconds.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, T5Config

from rlbook.cli import main
from rlbook.models import RLBookError, check_policy_name, load_policy, tiny_policy
from rlbook.rollout import evaluate, generate
from rlbook.tasks import Addition, Example, checked_reward, get_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "Model folders and preference files that are each wrong in one way."
    d = tmp_path_factory.mktemp("bad")
    model, tok = tiny_policy()
    model.save_pretrained(d / "no_tokenizer")  # config and weights, no tokenizer files
    tok.save_pretrained(d / "tokenizer_only")  # no config.json
    (d / "empty").mkdir()
    BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(d / "bert")
    tok.save_pretrained(d / "bert")
    T5Config(vocab_size=99, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(d / "t5")
    tok.save_pretrained(d / "t5")
    (d / "file.txt").write_text("not a model\n")
    good = '{"prompt": "1+2=", "chosen": "3", "rejected": "4"}\n'
    files = {"latin1.jsonl": good.encode() + b'{"prompt": "caf\xe9"}\n', "csv.jsonl": b"prompt,chosen,rejected\n",
             "list.jsonl": b'["1+2=", "3", "4"]\n', "nofield.jsonl": (good + '{"prompt": "1=", "chosen": "1"}\n').encode(),
             "number.jsonl": b'{"prompt": "1+2=", "chosen": 3, "rejected": "4"}\n', "blank.jsonl": b"\n\n",
             "half.jsonl": (good + '{"prompt": "1+2=", "cho').encode()}
    for name, content in files.items():
        (d / name).write_bytes(content)
    (d / "pairs_dir").mkdir()
    (d / "notebook.ipynb").write_text("this is not JSON")
    return d


def _d(folders, s: str) -> str:
    return s.replace("{D}", str(folders))


# ---------------------------------------------------------------- rlbook train: (method flags..., needle)
TRAIN = [
    # argparse: types, unknown names, missing values
    (["--acc-min", "high"], "argument --acc-min: invalid float value: 'high'"),
    (["--steps", "ten"], "argument --steps: invalid int value"),
    (["--clip-eps-low", "0.2.1"], "argument --clip-eps-low"),
    (["--overlong-cache", "2.5"], "argument --overlong-cache: invalid int value"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--method", "ppo2"], "argument --method: invalid choice: 'ppo2'"),
    (["--beta"], "argument --beta: expected one argument"),
    (["--filter-groups=yes"], "--filter-groups"),
    (["--n-pairs", "1e3", "--method", "dpo"], "argument --n-pairs: invalid int value"),
    # a flag of another method
    (["--entropy-coef", "0.1"], "--entropy-coef is not a setting of method 'grpo'; it belongs to --method grpo_entropy"),
    (["--label-smoothing", "0.1"], "--label-smoothing is not a setting of method 'grpo'"),
    (["--clip-eps", "0.2"], "--clip-eps is not a setting of method 'grpo'; it belongs to --method ppo"),
    (["--method", "dpo", "--acc-min", "0.1"], "--acc-min is not a setting of method 'dpo'"),
    (["--method", "dpo", "--gamma", "0.9"], "--gamma is not a setting of method 'dpo'"),
    (["--method", "sft", "--beta", "0.1"], "--beta is not a setting of method 'sft'"),
    (["--method", "rloo", "--eta", "1.0"], "--eta is not a setting of method 'rloo'"),
    (["--method", "nash_md", "--xpo-alpha", "1.0"], "--xpo-alpha is not a setting of method 'nash_md'"),
    # GRPO family (chapter grpo): GRPOConfig.check
    (["--acc-min", "0.9", "--acc-max", "0.1"], "--acc-min=0.9 > --acc-max=0.1 would mask every group"),
    (["--method", "dapo", "--acc-min", "0.6", "--acc-max", "0.5"], "would mask every group"),
    (["--clip-eps-low", "-0.1"], "--clip-eps-low=-0.1 must be >= 0"),
    (["--method", "dapo", "--clip-eps-high", "-0.28"], "--clip-eps-high=-0.28 must be >= 0"),
    (["--beta", "-0.04"], "--beta=-0.04 must be >= 0"),
    (["--method", "gspo", "--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--acc-max", "inf"], "--acc-max must be a finite number, got inf"),
    (["--clip-eps-low", "nan"], "--clip-eps-low must be a finite number"),
    (["--overlong-cache", "-4"], "--overlong-cache=-4 must be an integer >= 0"),
    (["--overlong-penalty", "-1"], "--overlong-penalty=-1.0 must be >= 0"),
    (["--method", "nft", "--nft-min-ratio", "0"], "--nft-min-ratio=0.0 must be in (0, 1]"),
    (["--method", "nft", "--nft-min-ratio", "2"], "--nft-min-ratio=2.0 must be in (0, 1]"),
    (["--kl-estimator", "k5"], "--kl-estimator must be one of ['k1', 'k2', 'k3'], got 'k5'"),
    (["--method", "dr_grpo", "--adv-std", "global"], "--adv-std must be one of"),
    (["--aggregation", "token-mean"], "--aggregation must be one of"),
    (["--method", "gspo", "--ratio-level", "seq"], "--ratio-level must be one of"),
    # entropy (chapter entropy): checked by its setup before a model is loaded
    (["--method", "grpo_entropy", "--entropy-control", "magic"], "--entropy-control must be one of"),
    (["--method", "grpo_entropy", "--entropy-low", "0.5", "--entropy-high", "0.4"], "0 <= --entropy-low < --entropy-high"),
    (["--method", "grpo_entropy", "--entropy-coef", "-1"], "--entropy-coef >= 0"),
    (["--method", "grpo_entropy", "--clip-cov-ratio", "1.5"], "0 < --clip-cov-ratio <= 1"),
    (["--method", "grpo_entropy", "--kl-cov-ratio", "0"], "0 < --kl-cov-ratio <= 1"),
    (["--method", "grpo_entropy", "--high-entropy-frac", "nan"], "--high-entropy-frac must be a finite number"),
    (["--method", "grpo_entropy", "--clip-cov-lb", "5", "--clip-cov-ub", "1"], "--clip-cov-lb < --clip-cov-ub"),
    (["--method", "grpo_entropy", "--acc-min", "1", "--acc-max", "0"], "would mask every group"),
    # REINFORCE family and Nash (type and finiteness of every option)
    (["--method", "rloo", "--gamma", "nan"], "--gamma must be a finite number, got nan"),
    (["--method", "reinforce_pp", "--gamma", "inf"], "--gamma must be a finite number, got inf"),
    (["--method", "remax", "--beta=-inf"], "--beta must be a finite number, got -inf"),
    (["--method", "nash_md", "--eta", "inf"], "--eta must be a finite number, got inf"),
    (["--method", "sppo", "--oracle-strength", "nan"], "--oracle-strength must be a finite number"),
    (["--method", "dno", "--beta", "nan"], "--beta must be a finite number"),
    # PPO and reward models: checked by their setups before a model is loaded
    (["--method", "ppo", "--clip-eps", "0"], "--clip-eps > 0"),
    (["--method", "ppo", "--lam", "1.5"], "0 <= --lam <= 1"),
    (["--method", "ppo", "--critic-init", "value"], "--critic-init must be one of ['policy', 'reward'], got 'value'"),
    (["--method", "ppo", "--ensemble", "max"], "--ensemble must be one of ['mean', 'min', 'uwo'], got 'max'"),
    (["--method", "ppo", "--critic-init", "reward"], "--critic-init='reward' needs a --reward-model"),
    (["--method", "ppo", "--reward-model", "{D}/no_such_run"], "--reward-model {D}/no_such_run is not a folder"),
    (["--method", "ppo", "--reward-model", "{D}/empty"], "--reward-model {D}/empty holds no usable checkpoint"),
    (["--method", "ppo", "--vf-coef", "nan"], "--vf-coef must be a finite number"),
    (["--method", "ppo", "--gold", "secret"], "--gold must be '' or one of"),
    (["--method", "rm", "--label-noise", "0.7"], "--label-noise must be in [0, 0.5]"),
    (["--method", "rm", "--gold", "secret"], "--gold must be one of"),
    (["--method", "rm", "--center-coef", "nan"], "--center-coef must be a finite number"),
    # options dataclasses with their own check(): refused before a model is loaded
    (["--method", "reinforce", "--kl-estimator", "k4"], "--kl-estimator must be one of ['k1', 'k2', 'k3']"),
    (["--method", "rloo", "--aggregation", "sum"], "--aggregation must be one of"),
    (["--method", "remax", "--beta", "-0.1"], "--beta=-0.1 must be >= 0"),
    (["--method", "reinforce_pp", "--gamma", "0"], "--gamma=0.0 must be in (0, 1]"),
    (["--method", "reinforce_pp", "--gamma", "1.5"], "--gamma=1.5 must be in (0, 1]"),
    (["--method", "ppo", "--vf-coef", "-1"], "--vf-coef >= 0"),
    (["--method", "ppo", "--gamma", "2"], "0 <= --gamma <= 1"),
    (["--method", "ppo", "--uncertainty-coef", "-0.5"], "--uncertainty-coef >= 0"),
    (["--method", "ppo", "--missing-eos-penalty", "-1"], "--missing-eos-penalty >= 0"),
    (["--method", "nash_md", "--oracle-strength", "0.9"], "--oracle-strength=0.9 must be in [0, 0.5]"),
    (["--method", "inpo", "--eta", "-1"], "--eta=-1.0 must be > 0"),
    (["--method", "dno", "--beta", "0"], "--beta=0.0 must be > 0"),
    (["--method", "rm", "--oracle-beta", "0"], "--oracle-beta > 0"),
    (["--method", "rm", "--label-smoothing", "0.8"], "0 <= --label-smoothing <= 0.5"),
    (["--method", "rm", "--pair-temperature", "-1"], "--pair-temperature > 0"),
    (["--method", "rm", "--eval-pairs", "0"], "--eval-pairs >= 1"),
    (["--method", "spin", "--xpo-alpha", "-1"], "--ref-sync-every, --xpo-alpha and --online-kl must be >= 0"),
    # DPO family (chapter dpo): DPOConfig.check, then the pairs file before any model
    (["--method", "dpo", "--beta", "0"], "--beta must be > 0, got 0.0"),
    (["--method", "ipo", "--beta", "nan"], "--beta must be a finite number"),
    (["--method", "cdpo", "--label-smoothing", "0.7"], "--label-smoothing must be in [0, 0.5]"),
    (["--method", "rdpo", "--flip-rate", "0.5"], "--flip-rate in [0, 0.5)"),
    (["--method", "fdpo", "--divergence", "hellinger"], "--divergence must be one of"),
    (["--method", "fdpo", "--f-alpha", "0"], "--f-alpha must be in (0, 1]"),
    (["--method", "rpo", "--rpo-alpha", "-1"], "--rpo-alpha must be >= 0"),
    (["--method", "kto", "--kto-lambda-u", "-0.5"], "--kto-lambda-u must be >= 0"),
    (["--method", "simpo", "--simpo-gamma", "inf"], "--simpo-gamma must be a finite number"),
    (["--method", "dpo", "--n-pairs", "0"], "--n-pairs must be positive"),
    (["--method", "dpo", "--oracle-beta", "0"], "--oracle-beta must be > 0"),
    (["--method", "dpo", "--gold-partial", "1.5"], "--gold-partial must be in [0, 1]"),
    (["--method", "dpo", "--data-seed", "-1"], "--data-seed must be an integer >= 0"),
    (["--method", "dpo", "--label-noise", "-0.1"], "--label-noise in [0, 0.5]"),
    (["--method", "dpo", "--pairs-path", "{D}/missing.jsonl"], "--pairs-path '{D}/missing.jsonl': no such file"),
    (["--method", "dpo", "--pairs-path", "{D}/pairs_dir"], "is a folder, not a .jsonl/.json/.parquet/.csv file"),
    (["--method", "dpo", "--pairs-path", "{D}/latin1.jsonl"], "{D}/latin1.jsonl, line 2: not UTF-8 text"),
    (["--method", "dpo", "--pairs-path", "{D}/csv.jsonl"], "{D}/csv.jsonl, line 1: not JSON"),
    (["--method", "ipo", "--pairs-path", "{D}/list.jsonl"], "{D}/list.jsonl, line 1: a JSON list"),
    (["--method", "kto", "--pairs-path", "{D}/nofield.jsonl"], "{D}/nofield.jsonl, line 2: no field 'rejected'"),
    (["--method", "dpo", "--pairs-path", "{D}/number.jsonl"], "line 1: field 'chosen' must be a string (or a list of chat messages), got int"),
    (["--method", "dpo", "--pairs-path", "{D}/blank.jsonl"], "has no records"),
    (["--method", "simpo", "--pairs-path", "{D}/half.jsonl"], "{D}/half.jsonl, line 2: not JSON"),
    # online DPO (chapter online_dpo): its setup checks before loading
    (["--method", "online_dpo", "--ref-sync-every", "-1"], "--ref-sync-every, --xpo-alpha and --online-kl must be >= 0"),
    (["--method", "xpo", "--xpo-alpha", "-0.5"], "must be >= 0"),
    (["--method", "hypo", "--online-kl", "nan"], "--online-kl must be a finite number"),
    (["--method", "spin", "--beta", "-1"], "--beta must be > 0"),
    # TRL's names (chapter cli): another spelling of one setting with another value, a value without counterpart,
    # a name of another method's setting; checks of the setting name the flag as the user gave it
    (["--num-generations", "4", "--group-size", "8"],
     "--num-generations 4 means --group-size 4 for --method grpo, but --group-size 8 is also given: give one of them"),
    (["--learning-rate", "1e-5", "--lr", "1e-4"], "--learning-rate 1e-05 means --lr 1e-05 for --method grpo, but --lr"),
    (["--max-steps", "7"], "--max-steps 7 means --steps 7 for --method grpo, but --steps 2 is also given"),
    (["--method", "ppo", "--epsilon", "0.1", "--cliprange", "0.2"],
     "--cliprange 0.2 means --clip-eps 0.2 for --method ppo, but --epsilon 0.1 is also given"),
    (["--method", "ppo", "--epsilon", "0.1", "--epsilon-high", "0.3"], "but --epsilon 0.1 is also given: give one of them"),
    (["--loss-type", "dapo", "--aggregation", "seq_mean"],
     "--loss-type dapo means --aggregation token_mean for --method grpo, but --aggregation seq_mean is also given"),
    (["--method", "fdpo", "--f-alpha-divergence-coef", "0.3", "--f-alpha", "0.5"], "means --f-alpha 0.7 for --method fdpo"),
    (["--method", "sft", "--num-iterations", "2", "--epochs", "3"], "but --epochs 3 is also given"),
    (["--model-name-or-path", ""], "--model-name-or-path '' means --model ''"),
    (["--method", "dpo", "--loss-type", "ipo"], "--loss-type ipo is a method of its own here: use --method ipo"),
    (["--method", "ipo", "--loss-type", "sigmoid"], "--loss-type sigmoid is a method of its own here: use --method dpo"),
    (["--method", "kto", "--loss-type", "robust"], "use --method rdpo"),
    (["--method", "dpo", "--loss-type", "hinge"], "--loss-type 'hinge' has no counterpart here; TRL's values that map"),
    (["--loss-type", "ipo"], "use --method ipo"), (["--loss-type", "cispo"], "use --method cispo"),
    (["--method", "cispo", "--loss-type", "dapo"], "is TRL's clipped loss, not cispo's: use --method grpo --loss-type dapo"),
    (["--method", "sapo", "--loss-type", "cispo"], "use --method cispo"),
    (["--loss-type", "luspo"], "--loss-type 'luspo' has no counterpart here"),
    (["--method", "nft", "--loss-type", "grpo"], "--loss-type is not a setting of method 'nft'; it belongs to --method grpo"),
    (["--method", "online_dpo", "--loss-type", "sigmoid"], "--loss-type is not a setting of method 'online_dpo'"),
    (["--cliprange", "0.2"], "--cliprange is not a setting of method 'grpo'; it belongs to --method ppo | prime"),
    (["--kl-coef", "0.1"], "--kl-coef is not a setting of method 'grpo'; it belongs to --method ppo"),
    (["--method", "sft", "--epsilon", "0.2"], "--epsilon is not a setting of method 'sft'; it belongs to --method grpo"),
    (["--method", "ppo", "--importance-sampling-level", "token"], "--importance-sampling-level is not a setting of method 'ppo'"),
    (["--method", "dpo", "--f-divergence-type", "js_divergence"], "it belongs to --method fdpo"),
    (["--method", "dpo", "--desirable-weight", "2"], "--desirable-weight is not a setting of method 'dpo'; it belongs to --method kto"),
    (["--method", "grpo", "--normalize-advantages"], "it belongs to --method reinforce | rloo | remax | reinforce_pp"),
    (["--max-steps", "41", "--epochs", "2"], "--max-steps counts optimizer updates (TRL) and this run makes 2 per step"),
    (["--method", "ppo", "--max-steps", "10"], "this run makes 4 per step"), (["--max-steps", "0"], "--max-steps must be a positive integer"),
    (["--method", "fdpo", "--f-alpha-divergence-coef", "1"], "--f-alpha-divergence-coef must be in [0, 1)"),
    (["--method", "fdpo", "--f-divergence-type", "hellinger"], "--f-divergence-type 'hellinger' has no counterpart here"),
    (["--scale-rewards", "sometimes"], "--scale-rewards 'sometimes' has no counterpart here"),
    (["--importance-sampling-level", "seq"], "--importance-sampling-level 'seq' has no counterpart here"),
    (["--num-generations", "four"], "argument --num-generations: invalid int value: 'four'"),
    (["--method", "rloo", "--normalize-advantages=yes"], "--normalize-advantages"),
    (["--num-generations", "3"], "--num-generations 3 does not divide --batch-size 512"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0"),
    (["--max-completion-length", "0"], "--max-completion-length must be a positive integer"),
    (["--epsilon", "-0.1"], "--epsilon=-0.1 must be >= 0"), (["--epsilon-high", "inf"], "--epsilon-high must be a finite number"),
    (["--method", "ppo", "--cliprange-value", "nan"], "--cliprange-value must be a finite number"),
    (["--method", "ppo", "--kl-coef", "-1"], "--kl-coef >= 0"),
    (["--method", "kto", "--desirable-weight", "-1"], "--desirable-weight must be >= 0"),
    (["--method", "sapo", "--sapo-temperature-neg", "0"], "--sapo-temperature-neg > 0"),
    (["--method", "cispo", "--epsilon-high", "0"], "--epsilon-high > 0"),
    # the method as the first word: `rlbook train ipo`
    (["ipo", "--method", "dpo"], "--method dpo and `rlbook train ipo` name two methods: give one"),
    (["ppo2"], "'ppo2' is not a method of `rlbook train`; methods: grpo, dr_grpo"),
    (["--batch-size", "64", "32"], "'32' is not a method of `rlbook train`"),
    (["dpo", "--acc-min", "0.1"], "--acc-min is not a setting of method 'dpo'"),
    # TrainConfig through check_config (the full list is in test_bad_config.py)
    (["--steps", "0"], "--steps"),
    (["--batch-size", "10", "--group-size", "4"], "does not divide"),
    (["--lr", "nan"], "--lr"),
    (["--temperature", "-1"], "--temperature"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    # task and model names, checked without loading anything
    (["--task", "subtraction"], "--task 'subtraction' is not a task; tasks: addition"),
    (["--task", ""], "--task must be a non-empty string, got ''"),
    (["--model", "/no/such/folder"], "cannot load policy '/no/such/folder': no such folder, and not a valid hub id"),
    (["--model", "runs/a/b/c"], "no such folder, and not a valid hub id"),
    (["--model", "my model"], "not a valid hub id"),
    (["--model", ""], "--model must be a non-empty string, got ''"),
    (["--model", "{D}/file.txt"], "not a valid hub id"),
    (["--model", "{D}/no_tokenizer"], "'{D}/no_tokenizer': it has no tokenizer files"),
    (["--model", "{D}/tokenizer_only"], "it has no config.json"),
    (["--model", "{D}/empty"], "it has no config.json and no tokenizer files"),
]


@pytest.mark.parametrize("flags, needle", TRAIN, ids=[" ".join(f) for f, _ in TRAIN])
def test_train_refuses_in_one_line(flags, needle, folders, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--steps", "2", "--no-progress", "--out", str(out)]
    assert main(argv + [_d(folders, f) for f in flags]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlbook: error: "), err
    assert _d(folders, needle) in lines[0], lines[0]
    assert not out.exists(), "a refused run wrote its folder"


# --model folders whose config is not a causal LM need the config read, still without weights
CONFIGS = [("{D}/bert", "its config is 'bert', a bidirectional encoder"),
           ("{D}/t5", "its config is 't5', an encoder-decoder model")]


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("model, needle", CONFIGS, ids=["bert", "t5"])
def test_non_causal_model_is_refused(command, model, needle, folders, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--steps", "2", "--no-progress", "--out", str(out)] if command == "train" else ["--n", "2"]
    assert main([command, "--model", _d(folders, model)] + extra) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlbook: error: ") and _d(folders, needle) in lines[0], lines
    assert "causal" in lines[0] and not out.exists()


# ---------------------------------------------------------------- rlbook eval and rlbook exercises
OTHER = [
    (["eval", "--n", "0"], "--n must be a positive integer, got 0"),
    (["eval", "--n", "-5"], "--n must be a positive integer"),
    (["eval", "--n", "many"], "argument --n: invalid int value"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["eval", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["eval", "--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["eval", "--seed", "-1"], "--seed must be >= 0"),
    (["eval", "--task", "division"], "--task 'division' is not a task"),
    (["eval", "--model", "/no/such/folder"], "no such folder, and not a valid hub id"),
    (["eval", "--model", "{D}/no_tokenizer"], "it has no tokenizer files"),
    (["eval", "--model", "tiny", "--device", "tpu"], "device 'tpu'; use 'cpu', 'cuda'"),
    (["eval", "--model", "tiny", "--device", "cuda:7"], "cuda:7"),
    (["eval", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: command"),
    (["fit"], "argument command: invalid choice: 'fit'"),
    (["exercises"], "the following arguments are required: action"),
    (["train", "no_such_method", "--help"], "'no_such_method' is not a method of `rlbook train`"),
    (["train", "dpo", "--method", "ipo", "--help"], "name two methods: give one"),
    (["train", "--method", "nope", "--help"], "argument --method: invalid choice: 'nope'"),
    (["exercises", "grade"], "invalid choice: 'grade'"),
    (["exercises", "check"], "the following arguments are required: chapter"),
    (["exercises", "check", "no_such_chapter"], "unknown chapter 'no_such_chapter'"),
    (["exercises", "check", "10", "--notebook", "{D}/missing.ipynb"], "no such file"),
    (["exercises", "check", "10", "--module", "{D}/missing.py"], "no such file"),
    (["exercises", "check", "10", "--notebook", "{D}/notebook.ipynb"], "is not a notebook"),
    (["exercises", "check", "10", "--notebook", "a.ipynb", "--module", "b.py"], "not allowed with argument"),
]


@pytest.mark.parametrize("argv, needle", OTHER, ids=[" ".join(a) or "(nothing)" for a, _ in OTHER])
def test_eval_and_exercises_refuse_in_one_line(argv, needle, folders, capsys):
    assert main([_d(folders, a) for a in argv]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlbook: error: ") and _d(folders, needle) in lines[0], lines


SUBPROCESS = [(["train", "--acc-min", "0.9", "--acc-max", "0.1"], "would mask every group"),
              (["train", "--method", "dpo", "--pairs-path", "{D}/latin1.jsonl"], "line 2: not UTF-8 text"),
              (["eval", "--model", "{D}/no_tokenizer"], "it has no tokenizer files")]


def test_one_line_end_to_end(folders, tmp_path):
    "Real `python -m rlbook.cli` processes (run side by side): status 2, one line on stderr, nothing written."
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    runs = []
    for i, (argv, needle) in enumerate(SUBPROCESS):
        cwd = tmp_path / str(i)
        cwd.mkdir()
        extra = ["--model", "tiny", "--no-progress", "--out", str(cwd / "run")] if argv[0] == "train" else []
        p = subprocess.Popen([sys.executable, "-m", "rlbook.cli"] + [_d(folders, a) for a in argv] + extra,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        runs.append((p, _d(folders, needle), cwd))
    for p, needle, cwd in runs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 2, err[-2000:]
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("rlbook: error: ") and needle in lines[0], err
        assert out == "" and list(cwd.iterdir()) == []  # no run folder, no stray file


# ---------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny", device="cpu")


def _one_line(call, needle):
    with pytest.raises(RLBookError) as err:
        call()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


GENERATE = [
    (dict(prompts="12+34="), "got the string '12+34='"), (dict(prompts=b"12+34="), "got the string"),
    (dict(prompts=[]), "empty list"), (dict(prompts=None), "got NoneType"), (dict(prompts={"1=": 1}), "got dict"),
    (dict(prompts=["1=", 7]), "prompts[1] is a int"), (dict(prompts=("1=", None)), "prompts[1] is a NoneType"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=-0.1), "top_p"), (dict(group_size=0), "group_size"), (dict(group_size=-2), "group_size"),
    (dict(group_size=2.0), "group_size"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens"), (dict(prompts=["1" * 200]), "exceeds the model context"),
]


@pytest.mark.parametrize("kwargs, needle", GENERATE, ids=[repr(k)[:40] for k, _ in GENERATE])
def test_generate_refuses(kwargs, needle, policy):
    args = {"prompts": ["1+1="], "max_new_tokens": 4, **kwargs}
    model, tok = policy
    _one_line(lambda: generate(model, tok, args.pop("prompts"), **args), needle)


class _Custom(Addition):
    "Addition whose reward is whatever `out` gives."

    def __init__(self, out):
        super().__init__()
        self.out = out

    def reward(self, example, completion):
        return self.out() if callable(self.out) else self.out


REWARDS = [("1.0", "returned str '1.0'"), (None, "returned NoneType"), ([1.0], "returned list"),
           ({"r": 1}, "returned dict"), (torch.ones(3), "tensor of shape (3,)"), (1 + 2j, "returned complex"),
           (float("nan"), "returned nan"), (-math.inf, "returned -inf"), (np.float64("inf"), "returned inf"),
           (lambda: 1 / 0, "raised ZeroDivisionError"), (lambda: {}["score"], "raised KeyError"),
           (object(), "returned object")]


@pytest.mark.parametrize("out, needle", REWARDS, ids=[n for _, n in REWARDS])
def test_reward_that_is_not_a_real_number(out, needle, policy):
    "The same one line from checked_reward directly and from evaluate (training's `score` uses it too)."
    ex = Example(prompt="1+2=", answer="3", solution="3")
    _one_line(lambda: checked_reward(_Custom(out), ex, "3"), needle)
    model, tok = policy
    _one_line(lambda: evaluate(model, tok, _Custom(out), n=2, max_new_tokens=2), needle)


API = [
    (lambda m, t: evaluate(m, t, get_task("addition"), n=0), "n must be a positive integer"),
    (lambda m, t: evaluate(m, t, get_task("addition"), n=2, batch_size=0), "batch_size must be a positive integer"),
    (lambda m, t: evaluate(m, t, get_task("addition"), n=2, temperature=float("nan")), "temperature"),
    (lambda m, t: evaluate(m, t, get_task("addition"), n=2, max_new_tokens=0), "max_new_tokens"),
    (lambda m, t: get_task("subtraction"), "unknown task 'subtraction'"),
    (lambda m, t: get_task("addition", digits=3), "bad arguments for task 'addition'"),
    (lambda m, t: get_task("addition", max_digits=-1), "max_digits must be an integer >= 1, got -1"),
    (lambda m, t: get_task("addition", min_digits=0), "min_digits must be an integer >= 1"),
    (lambda m, t: get_task("addition", min_digits=4, max_digits=2), "min_digits (4) must be <= max_digits (2)"),
    (lambda m, t: get_task("multiplication", min_digits=1.5), "min_digits must be an integer"),
    (lambda m, t: get_task("multiplication", max_digits="3"), "max_digits must be an integer"),
    (lambda m, t: get_task("addition_fewshot", max_digits=True), "max_digits must be an integer"),
    (lambda m, t: get_task("countdown", n_numbers=0), "n_numbers must be an integer >= 1"),
    (lambda m, t: get_task("countdown", max_number=-3), "max_number must be an integer >= 1"),
    (lambda m, t: get_task("countdown", ops="%"), "ops must be a non-empty subset"),
    (lambda m, t: get_task("countdown", use_all="yes"), "use_all a bool"),
    (lambda m, t: get_task("reverse", min_len=0), "min_len must be an integer >= 1"),
    (lambda m, t: get_task("reverse", alphabet="a b"), "alphabet must be non-empty printable ASCII"),
    (lambda m, t: get_task("sort", alphabet=["a"]), "alphabet must be a string"),
    (lambda m, t: get_task("sort", min_len=5, max_len=2), "min_len (5) must be <= max_len (2)"),
    (lambda m, t: get_task("sentiment", target="neutral"), "target must be 'positive' or 'negative'"),
    (lambda m, t: get_task("sentiment", threshold=float("nan")), "threshold must be a finite number"),
    (lambda m, t: load_policy("no such model!"), "not a valid hub id"),
    (lambda m, t: load_policy(""), "a policy name must be a non-empty string"),
    (lambda m, t: load_policy("tiny", device="tpu"), "device 'tpu'; use 'cpu'"),
    (lambda m, t: load_policy("tiny", dtype="float8"), "unknown dtype 'float8'"),
    (lambda m, t: check_policy_name(None), "a policy name must be a non-empty string"),
]


@pytest.mark.parametrize("call, needle", API, ids=[n for _, n in API])
def test_api_refuses(call, needle, policy):
    _one_line(lambda: call(*policy), needle)


MODEL_FOLDERS = [("no_tokenizer", "it has no tokenizer files"), ("tokenizer_only", "it has no config.json"),
                 ("bert", "a bidirectional encoder"), ("t5", "an encoder-decoder model"),
                 ("file.txt", "not a valid hub id")]


@pytest.mark.parametrize("name, needle", MODEL_FOLDERS, ids=[n for n, _ in MODEL_FOLDERS])
def test_load_policy_refuses_folders(name, needle, folders):
    _one_line(lambda: load_policy(str(folders / name)), needle)


def test_corpus_size():
    """The corpus tries at least 150 (bad input, entry point) pairs: a reward is tried through checked_reward and
    evaluate, a non-causal folder through train and eval; the subprocess cases repeat in-process ones."""
    n = (len(TRAIN) + 2 * len(CONFIGS) + len(OTHER) + len(SUBPROCESS) + len(GENERATE) + 2 * len(REWARDS)
         + len(API) + len(MODEL_FOLDERS))
    assert n >= 150, n
