"""Tests of the preference-data chapter (rlbook.preference_data): the gold reward, labelling with one draw per pair,
validation and the JSONL reader, the sampled dataset, the step's share, the encoding, and the batches that the
chapters built on it (reward models, DPO, online DPO) collect."""
import json
import re

import pytest
import torch

from rlbook.models import RLBookError, load_policy
from rlbook.preference_data import (PreferenceTask, TaskGold, encode_preferences, epoch_indices, gold_oracle,
                                    label_pairs, make_preference_pairs, pair_logprobs, read_pairs, register_examples,
                                    validate_pairs)
from rlbook.tasks import BradleyTerryOracle, CyclicOracle, Example, get_task
from rlbook.train import check_batch

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", device="cpu")


# ---------------------------------------------------------------- gold reward and labels
def test_task_gold_and_gold_oracle():
    task = get_task("addition")
    ex = Example("12+34=", "46", "46")
    oracle = gold_oracle(task, beta=0.2, label_noise=0.1, partial=0.4)
    assert isinstance(oracle, BradleyTerryOracle) and (oracle.beta, oracle.label_noise) == (0.2, 0.1)
    assert isinstance(oracle.reward_fn, TaskGold) and oracle.reward_fn.partial == 0.4
    with pytest.raises(RLBookError, match="unknown prompt"):
        oracle.gold_reward(ex.prompt, "46")
    register_examples(oracle, [ex])
    assert oracle.gold_reward(ex.prompt, "46") == 1.0
    assert oracle.gold_reward(ex.prompt, "36") == pytest.approx(0.4 * 1 / 2)  # last digit right
    assert oracle.gold_reward(ex.prompt, "146") == pytest.approx(0.4 * 2 / 3)
    register_examples(CyclicOracle(0.3), [ex])  # an oracle without a TaskGold needs nothing


def test_label_pairs_draws_once_per_pair_in_order():
    prompts, a, b = ["1+1="] * 5, ["2", "3", "2", "4", "5"], ["3", "2", "2", "2", "2"]
    oracle = CyclicOracle(0.4)
    recs = label_pairs(prompts, a, b, oracle, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    for r, x, y in zip(recs, a, b):
        a_wins = torch.rand((), generator=g, dtype=torch.float64).item() < oracle.prob("1+1=", x, y)
        assert (r["chosen"], r["rejected"]) == ((x, y) if a_wins else (y, x))
        assert set(r) == {"prompt", "chosen", "rejected"}  # no gold reward to record
    # the generator is left exactly 5 draws on: a caller that keeps using it sees the same stream as before
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    label_pairs(prompts, a, b, oracle, g1)
    torch.rand(5, generator=g2, dtype=torch.float64)
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(RLBookError, match="5 prompts"):
        label_pairs(prompts, a, b[:4], oracle, g1)


# ---------------------------------------------------------------- checks and files
def test_validate_pairs_cases(tiny):
    _, tok = tiny
    ok = {"prompt": "1+2=", "chosen": "3", "rejected": "4"}
    kept, st = validate_pairs([ok, dict(ok, rejected="3"), dict(ok, chosen=" "), dict(ok, prompt="1" * 127)], tok)
    assert kept == [ok]
    assert st == {"pairs/kept": 1, "skipped/identical": 1, "skipped/empty": 1, "skipped/too_long": 1}
    for bad in ([{"prompt": "1", "chosen": "2"}], ["not a dict"], [dict(ok, rejected=None)], [dict(ok, chosen="4", rejected="4")]):
        with pytest.raises(RLBookError):
            validate_pairs(bad, tok)


def test_read_pairs_names_bad_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{oops\n')
    with pytest.raises(RLBookError, match="line 2"):
        read_pairs(p)


def test_read_pairs_refuses_bad_files_with_file_line_and_field(tmp_path):
    ok = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
    cases = {"bom.jsonl": ("\ufeff" + ok).encode(), "cp1252.jsonl": ok.encode() + b'{"prompt": "\x93x\x94"}\n',
             "scalar.jsonl": (ok + "42\n").encode(), "null.jsonl": b'{"prompt": "1=", "chosen": null, "rejected": "3"}\n'}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    assert read_pairs(tmp_path / "bom.jsonl") == [json.loads(ok)]  # a UTF-8 byte-order mark is accepted
    for name, needle in [("cp1252.jsonl", "line 2: not UTF-8"), ("scalar.jsonl", "line 2: a JSON int"),
                         ("null.jsonl", "line 1: field 'chosen' must be a string (or a list of chat messages), got NoneType"),
                         ("absent.jsonl", "no such file"), (".", "is a folder")]:
        with pytest.raises(RLBookError, match=re.escape(needle)) as err:
            read_pairs(tmp_path / name)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- a sampled dataset, step by step
def test_make_preference_pairs_is_deterministic_and_labels_follow_gold(tiny):
    model, tok = tiny
    task = get_task("addition")
    a, st = make_preference_pairs(model, tok, task, gold_oracle(task, beta=0.01), 20, seed=3, chunk=32)
    b, _ = make_preference_pairs(model, tok, task, gold_oracle(task, beta=0.01), 20, seed=3, chunk=32)
    assert a == b and len(a) == 20 and st["pairs/kept"] == 20
    assert all(p["chosen"] != p["rejected"] for p in a)
    # with a near-deterministic annotator, the chosen answer never has a lower gold reward (ties are coin flips)
    assert all(p["gold_chosen"] >= p["gold_rejected"] for p in a)
    with pytest.raises(RLBookError):
        make_preference_pairs(model, tok, task, gold_oracle(task), 5, seed=0, temperature=0.0)


def test_epoch_indices_cover_each_pass():
    idx = [i for s in range(6) for i in epoch_indices(9, 3, s, seed=1)]
    assert sorted(idx[:9]) == list(range(9)) and sorted(idx[9:]) == list(range(9))


def test_preference_task_is_its_base_task_with_pairs():
    task = get_task("addition")
    pt = PreferenceTask(task, [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}], {"pairs/kept": 1})
    ex = task.sample(3, seed=2, split="test")
    assert pt.name == task.name and pt.sample(3, seed=2, split="test") == ex and pt.stats == {"pairs/kept": 1}
    assert [pt.reward(e, e.answer) for e in ex] == [task.reward(e, e.answer) for e in ex]
    assert pt.is_correct(ex[0], "x") == task.is_correct(ex[0], "x")


# ---------------------------------------------------------------- the encoding
def test_encode_preferences_keys_are_batch_fields(tiny):
    _, tok = tiny
    pairs = [{"prompt": "1+2=", "chosen": "3", "rejected": "44", "sample": "5", "reference_sample": "666"}] * 2
    enc = encode_preferences(tok, pairs, with_kl=True, extra=("sample", "reference_sample"))
    check_batch(enc)
    names = ("chosen", "rejected", "sample", "reference_sample", "kl")
    assert set(enc) == {f"{n}_{k}" for n in names for k in ("input_ids", "attention_mask", "completion_mask")}
    assert [enc[f"{n}_completion_mask"][0].sum().item() for n in names] == [2, 3, 2, 4, 2]  # tokens + EOS
    assert len({enc[f"{n}_input_ids"].shape for n in names}) == 1  # one width for all


def test_pair_logprobs_matches_separate_forward(tiny):
    model, tok = tiny
    pairs = [{"prompt": "12+34=", "chosen": "46", "rejected": "4"}, {"prompt": "9+9=", "chosen": "18", "rejected": "181"}]
    enc = encode_preferences(tok, pairs)
    lp = pair_logprobs(model, enc)
    from rlbook.logprobs import completion_logprobs
    from rlbook.rollout import encode_pairs
    for i, p in enumerate(pairs):
        for k in ("chosen", "rejected"):
            e = encode_pairs(tok, [p["prompt"]], [p[k]])
            want = (completion_logprobs(model, e["input_ids"], e["attention_mask"], e["completion_mask"].shape[1])["logp"]
                    * e["completion_mask"]).sum()
            assert torch.isclose(lp[f"{k}_logp"][i], want, atol=1e-5)
            assert lp[f"{k}_len"][i].item() == len(p[k]) + 1




# ---------------------------------------------------------------- the chapters built on it collect Batch fields only
@pytest.fixture(scope="module")
def sft_path():
    from rlbook.sft import warm_start
    return str(warm_start(progress=False))


def _consumers():
    from rlbook.dpo import CDPO, DPO, FDPO, IPO, KTO, RDPO, RPO, SIMPO
    from rlbook.online_dpo import HYPO, ONLINE_DPO, SPIN, XPO
    from rlbook.reward_model import REWARD_MODEL
    return [REWARD_MODEL, DPO, IPO, CDPO, RDPO, SIMPO, FDPO, RPO, KTO, ONLINE_DPO, XPO, SPIN, HYPO]


@pytest.mark.parametrize("M", _consumers(), ids=lambda m: m.name)
def test_every_collect_returns_batch_fields_only(M, sft_path, tmp_path):
    "One name, one meaning: every key that a collect of chapters 20, 30 and 31 returns is a field of rlbook.train.Batch."
    from dataclasses import replace

    from rlbook.train import build_run
    cfg = M.config(model=sft_path, steps=1, batch_size=8, eval_n=10, out=str(tmp_path), progress=False, device="cpu")
    opts = replace(M.options, n_pairs=16) if hasattr(M.options, "n_pairs") else M.options
    run = build_run(cfg, M, options=opts)
    batch, stats = M.collect(run)
    check_batch(batch, M.name)
    assert all(not k.startswith("ref_") or k.endswith("_logp") for k in batch), sorted(batch)  # ref_: under the reference
    if M.name == "xpo":
        assert "reference_sample_input_ids" in batch
