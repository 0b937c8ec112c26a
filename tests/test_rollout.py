"""The sampler of chapter rollout against a naive transcription: the same tokens, masks and log-probs as a loop
that re-runs the whole sequence every step (no cache, every row to the end) and draws with torch.multinomial;
finished rows leaving the batch changes nothing; the token frequencies match the softmax."""
import pytest
import torch

import rlbook.rollout as R
from rlbook.logprobs import completion_logprobs, position_ids_from_mask
from rlbook.models import load_policy
from rlbook.rollout import encode_prompts, generate, sample_token

PROMPTS = ["1+2=", "345+678=", "99+1=", "5="]


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=0)


@torch.no_grad()
def naive_generate(model, tokenizer, prompts, group_size, max_new_tokens, temperature, generator):
    "Every step re-runs the full sequence; every row is computed and sampled until the last row ends."
    rows = [p for p in prompts for _ in range(group_size)]
    ids, mask = encode_prompts(tokenizer, rows, "cpu")
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    toks, masks, logps = [], [], []
    for t in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        logp = (logits.float() / temperature).log_softmax(-1)
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, tokenizer.pad_token_id), tok)
        masks.append(~done)
        logps.append(torch.where(done, 0.0, logp.gather(-1, tok[:, None]).squeeze(-1)))
        toks.append(tok)
        done = done | (tok == tokenizer.eos_token_id)
        if done.all():
            break
        ids, mask = torch.cat([ids, tok[:, None]], 1), torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    return torch.stack(toks, 1), torch.stack(masks, 1).long(), torch.stack(logps, 1), ~done


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_equals_a_naive_sampler(tiny, temperature):
    model, tok = tiny
    ro = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=20, temperature=temperature,
                  generator=torch.Generator().manual_seed(11))
    ids, mask, logp, truncated = naive_generate(model, tok, PROMPTS, 4, 20, temperature,
                                                torch.Generator().manual_seed(11))
    assert ro.lengths.min() < ro.lengths.max()  # rows finished at different steps
    assert torch.equal(ro.completion_ids, ids) and torch.equal(ro.completion_mask, mask)
    assert torch.equal(ro.truncated, truncated)
    assert (ro.logp - logp).abs().max() < 1e-5


def test_dropping_finished_rows_changes_no_sample(tiny, monkeypatch):
    model, tok = tiny
    kw = dict(group_size=8, max_new_tokens=24)
    fast = generate(model, tok, PROMPTS, **kw, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(R, "_drop_rows", lambda past, keep: False)  # a cache that cannot drop rows
    monkeypatch.setattr(R, "DECODERS", {})  # (transformers' forward pass, whose cache _drop_rows serves)
    slow = generate(model, tok, PROMPTS, **kw, generator=torch.Generator().manual_seed(3))
    assert fast.lengths.min() < fast.lengths.max()
    assert torch.equal(fast.completion_ids, slow.completion_ids)
    assert torch.equal(fast.completion_mask, slow.completion_mask) and torch.equal(fast.truncated, slow.truncated)
    assert (fast.logp - slow.logp).abs().max() < 1e-5


def test_padding_and_eos_rules(tiny):
    model, tok = tiny
    ro = generate(model, tok, PROMPTS, group_size=8, max_new_tokens=12, generator=torch.Generator().manual_seed(4))
    assert ro.truncated.any() and (~ro.truncated).any()
    assert ro.prompts == [p for p in PROMPTS for _ in range(8)] and ro.group_size == 8
    for ids, m, lp, tr in zip(ro.completion_ids, ro.completion_mask, ro.logp, ro.truncated):
        eos = (ids == tok.eos_token_id).nonzero()
        if tr:
            assert not len(eos) and m.all()
        else:  # mask 1 up to and including the first EOS, padding with mask 0 and log-prob 0 after it
            e = int(eos[0])
            assert m[: e + 1].all() and not m[e + 1:].any() and (ids[e + 1:] == tok.pad_token_id).all()
        assert (lp[m == 0] == 0).all() and (lp[m == 1] < 0).all()


def test_sampling_pass_log_probs_equal_the_training_pass(tiny):
    model, tok = tiny
    for tau in (1.0, 0.6):
        ro = generate(model, tok, PROMPTS, group_size=4, max_new_tokens=16, temperature=tau,
                      generator=torch.Generator().manual_seed(5))
        lp = completion_logprobs(model, ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1], tau)["logp"]
        assert ((lp - ro.logp) * ro.completion_mask).abs().max() < 1e-5


def test_token_frequencies_match_the_softmax():
    z = torch.tensor([[1.5, 0.5, 0.0, -1.0, -3.0]]).expand(20000, 5)
    g = torch.Generator().manual_seed(0)
    for tau, p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        tokens = sample_token(z, tau, p, generator=g)[0]
        freq = torch.bincount(tokens, minlength=5) / len(tokens)
        want = (z[0] / tau).softmax(-1)
        if p < 1:  # the nucleus: the smallest prefix of the sorted tokens whose mass reaches p, renormalised
            keep = (want.cumsum(-1) - want) < p
            want = torch.where(keep, want, 0.0) / want[keep].sum()
        assert (freq - want).abs().max() < 4 * (0.25 / len(tokens)) ** 0.5, (tau, p, freq, want)


def test_training_under_bf16_autocast_samples_as_the_models_forward(tmp_path, monkeypatch):
    "accelerate's mixed precision replaces the policy's forward with an autocast one: sampling must go through it."
    from rlbook.grpo import GRPO
    from rlbook.train import read_metrics, train
    runs = {}
    for name, decoders in (("book", dict(R.DECODERS)), ("forward", {})):
        monkeypatch.setattr(R, "DECODERS", decoders)
        cfg = GRPO.config(model="tiny", steps=2, batch_size=16, group_size=4, max_new_tokens=8, eval_every=0,
                          eval_n=8, mixed_precision="bf16", out=str(tmp_path / name), progress=False, device="cpu")
        train(cfg, GRPO)
        runs[name] = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert runs["book"] == runs["forward"] and len(runs["book"]) >= 2
