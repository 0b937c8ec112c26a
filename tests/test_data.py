"""Your own data and rewards (chapter `data`): prompt files and reward functions from the command line and the
Python API, conversational prompts through a chat template, and one-line refusals that leave nothing on disk."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

import pytest

from rlbook.cli import main
from rlbook.data import PromptTask
from rlbook.grpo import GRPO
from rlbook.models import RLBookError, load_policy
from rlbook.rollout import evaluate
from rlbook.tasks import Addition
from rlbook.train import read_metrics, train

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    problems = Addition().sample(200, seed=0) + Addition().sample(30, seed=0, split="test")  # both sides of split_of
    problems = list({e.prompt: e for e in problems}.values())
    recs = [{"prompt": e.prompt, "answer": e.answer} for e in problems]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "worked.jsonl").write_text("".join(json.dumps(dict(r, completion=r["answer"])) + "\n" for r in recs))
    (d / "broken.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n{\"prompt\": 3}\n")
    (d / "rewards.py").write_text(
        "CALLS = []\n"
        "def short(prompts, completions, answer, **columns):\n"
        "    CALLS.append(len(completions))\n"
        "    return [1.0 if len(c) <= len(a) else 0.0 for c, a in zip(completions, answer)]\n")
    pairs = [{"prompt": e.prompt, "chosen": e.answer, "rejected": str(int(e.answer) + 1)} for e in problems[:64]]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return d, recs


def test_cli_trains_grpo_on_a_file_with_two_reward_functions(files, tmp_path, capsys):
    d, _ = files
    out = tmp_path / "run"
    rc = main(["train", "grpo", "--model", "tiny", "--dataset", str(d / "prompts.jsonl"),
               "--reward-fn", "rlbook.data:answer_reward", "--reward-fn", f"{d / 'rewards.py'}:short",
               "--reward-weights", "1", "0.5", "--steps", "2", "--batch-size", "16", "--group-size", "4",
               "--eval-every", "2", "--eval-n", "10", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 2 and all(0 <= r["reward/mean"] <= 1.5 for r in rows)
    assert "held-out accuracy" in capsys.readouterr().out


def test_cli_dpo_reads_pairs_from_dataset(files, tmp_path, capsys):
    d, _ = files
    rc = main(["train", "dpo", "--model", "tiny", "--dataset", str(d / "pairs.jsonl"), "--steps", "2",
               "--batch-size", "8", "--eval-every", "0", "--eval-n", "10", "--out", str(tmp_path / "dpo"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    kept = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert len(kept) == 64 and kept[0]["chosen"] != kept[0]["rejected"]


@pytest.mark.parametrize("argv, needle", [
    (["--reward-fn", "rlbook.data:answer_reward"], "--reward-fn needs --dataset"),
    (["--dataset", "{d}/broken.jsonl"], "broken.jsonl, line 3: field 'prompt' must be a string or a list of messages"),
    (["--dataset", "{d}/missing.jsonl"], "no such file"),
    (["--dataset", "{d}/prompts.jsonl", "--reward-fn", "{d}/rewards.py:long"], "has no 'long' (callables there: short)"),
    (["--dataset", "{d}/prompts.jsonl", "--reward-fn", "{d}/rewards.py:short", "--reward-weights", "1", "2"],
     "2 reward weights for 1 reward functions"),
    (["--method", "dpo", "--dataset", "{d}/pairs.jsonl", "--reward-fn", "rlbook.data:answer_reward"],
     "--reward-fn is for methods that sample"),
    (["--method", "dpo", "--dataset", "{d}/prompts.jsonl"], "prompts.jsonl, line 1: no field 'chosen'"),
])
def test_cli_refuses_bad_data_in_one_line(files, argv, needle, tmp_path, capsys):
    d, _ = files
    out = tmp_path / "never"
    rc = main(["train", *[a.format(d=d) for a in argv], "--model", "tiny", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert not out.exists()  # refused before anything is written


def test_reward_function_called_once_per_batch(files):
    d, recs = files
    task = PromptTask(recs, f"{d / 'rewards.py'}:short")
    fn = task.reward_funcs[0]
    fn.__globals__["CALLS"].clear()
    ex = task.sample(12, seed=0)
    assert task.rewards(ex, [e.answer for e in ex]) == [1.0] * 12
    assert fn.__globals__["CALLS"] == [12]
    fn.__globals__["CALLS"].clear()
    policy, tok = load_policy("tiny")
    res = evaluate(policy, tok, task, n=12, max_new_tokens=4, batch_size=8)  # correctness read from the batch's rewards
    assert fn.__globals__["CALLS"] == [8, 4] and res["accuracy"] == res["reward"]  # 0/1 rewards, success 1.0


def test_dpo_reads_pairs_from_parquet_json_and_chat_messages(files, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rlbook.dpo import DPO
    d, _ = files
    pairs = [json.loads(line) for line in (d / "pairs.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    rc = main(["train", "dpo", "--model", "tiny", "--dataset", str(tmp_path / "pairs.parquet"), "--steps", "1",
               "--batch-size", "8", "--eval-every", "0", "--eval-n", "10", "--out", str(tmp_path / "pq"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert [json.loads(x) for x in (tmp_path / "pq" / "pairs.jsonl").read_text().splitlines()] == pairs
    conv = [{"prompt": [{"role": "user", "content": p["prompt"]}], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    policy, tok = load_policy("tiny")
    tok.chat_template = TEMPLATE
    cfg = DPO.config(model="tiny", steps=1, batch_size=8, eval_every=0, eval_n=5, out=str(tmp_path / "conv"), progress=False)
    train(cfg, DPO, policy=policy, tokenizer=tok, options=DPO.options.__class__(pairs_path=str(tmp_path / "conv.json")))
    kept = [json.loads(x) for x in (tmp_path / "conv" / "pairs.jsonl").read_text().splitlines()]
    assert [(k["prompt"], k["chosen"], k["rejected"]) for k in kept] == [
        (f"<user>{p['prompt']}\n<assistant>", p["chosen"], p["rejected"]) for p in pairs]  # rendered, EOS left to encoding
    with pytest.raises(RLBookError, match="chat template"):  # the tiny model's own tokenizer has none
        train(DPO.config(model="tiny", steps=1, batch_size=8, eval_every=0, out=str(tmp_path / "notemplate"), progress=False),
              DPO, options=DPO.options.__class__(pairs_path=str(tmp_path / "conv.json")))


def test_kto_trains_on_unpaired_answers_and_other_methods_refuse_them(files, tmp_path, capsys):
    import torch

    from rlbook.dpo import KTO, kto_loss, kto_reference_point
    from rlbook.preference_data import epoch_indices, pair_logprobs
    from rlbook.train import build_run
    d, _ = files
    pairs = [json.loads(line) for line in (d / "pairs.jsonl").read_text().splitlines()]
    rows = [(p["prompt"], c, lab) for p in pairs for c, lab in ((p["chosen"], "true"), (p["rejected"], "0"))]
    (tmp_path / "answers.csv").write_text("prompt,completion,label\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    rc = main(["train", "kto", "--model", "tiny", "--dataset", str(tmp_path / "answers.csv"), "--steps", "2",
               "--batch-size", "8", "--eval-every", "0", "--eval-n", "10", "--out", str(tmp_path / "kto"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    kept = [json.loads(x) for x in (tmp_path / "kto" / "pairs.jsonl").read_text().splitlines()]
    assert [(k["prompt"], k["completion"], k["label"]) for k in kept] == [(a, b, c == "true") for a, b, c in rows]
    first = read_metrics(tmp_path / "kto" / "metrics.jsonl")[0]
    assert first["answers/kept"] == 128 and first["answers/desirable"] == 64
    # the step's loss is KTO's on each answer with its own label, the next answer as the mismatch (naive transcription)
    cfg = KTO.config(model="tiny", steps=1, batch_size=8, eval_n=5, out=str(tmp_path / "one"), progress=False, device="cpu")
    run = build_run(cfg, KTO, options=KTO.options.__class__(pairs_path=str(tmp_path / "answers.csv"), beta=0.3))
    with torch.no_grad():
        for p in run.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))  # the policy leaves the reference, so the loss depends on both
    batch, _ = KTO.collect(run)
    loss, _ = KTO.loss(run, dict(batch, n_seqs=8, n_tokens=0.0))
    items = [run.task.pairs[i] for i in epoch_indices(len(run.task.pairs), 8, 0, cfg.seed)]
    assert batch["label"].tolist() == [a["label"] for a in items]
    with torch.no_grad():
        lp, ref = pair_logprobs(run.policy, batch, ("answer", "kl")), pair_logprobs(run.ref, batch, ("answer", "kl"))
        z0 = kto_reference_point(lp["kl_logp"], ref["kl_logp"])
        want, _ = kto_loss(lp["answer_logp"], ref["answer_logp"], torch.tensor([a["label"] for a in items]), z0, beta=0.3)
    assert "chosen_input_ids" not in batch and abs(loss.item() - want.item()) < 1e-5
    out = tmp_path / "dpo-never"
    rc = main(["train", "dpo", "--model", "tiny", "--dataset", str(tmp_path / "answers.csv"), "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds unpaired" in err and "--method kto" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_conversational_prompts_train_through_the_chat_template(files, tmp_path):
    _, recs = files
    policy, tok = load_policy("tiny")
    tok.chat_template = TEMPLATE
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in recs]
    task = PromptTask(conv)
    cfg = GRPO.config(model="tiny", steps=1, batch_size=8, group_size=4, eval_every=1, eval_n=5,
                      out=str(tmp_path / "conv"), progress=False)
    run = train(cfg, GRPO, policy=policy, tokenizer=tok, task=task)
    assert run.task.sample(1, seed=0)[0].prompt.startswith("<user>")
    res = evaluate(policy, tok, task, n=5)  # evaluate renders too
    assert 0 <= res["accuracy"] <= 1
    cfg.out = str(tmp_path / "plain")
    with pytest.raises(RLBookError, match="chat template"):
        train(cfg, GRPO, task=task)  # the tiny model's own tokenizer has no template: refused before training
    assert not (tmp_path / "plain").exists()


def test_cli_eval_scores_the_held_out_prompts_of_a_dataset(files, capsys):
    d, _ = files
    rc = main(["eval", "--model", "tiny", "--dataset", str(d / "prompts.jsonl"), "--n", "8"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(res) >= {"accuracy", "reward"} and 0 <= res["accuracy"] <= 1
    rc = main(["eval", "--model", "tiny", "--reward-fn", "rlbook.data:answer_reward"])
    err = capsys.readouterr().err
    assert rc == 2 and "--reward-fn and --reward-weights need --dataset" in err and err.count("\n") == 1



def test_sft_learns_the_completion_column(files, tmp_path, capsys):
    d, _ = files
    common = ["--model", "tiny", "--steps", "2", "--batch-size", "8", "--eval-n", "5", "--no-progress"]
    assert main(["train", "sft", "--dataset", str(d / "worked.jsonl"), "--out", str(tmp_path / "a"), *common]) == 0
    capsys.readouterr()
    assert main(["train", "sft", "--dataset", str(d / "prompts.jsonl"), "--out", str(tmp_path / "b"), *common]) == 2
    err = capsys.readouterr().err
    assert "needs a 'completion' column" in err and err.count("\n") == 1, err
