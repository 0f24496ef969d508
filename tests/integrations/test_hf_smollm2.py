"""The embedded SmolLM2: kvkit's dense cache reproduces transformers token for token."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvkit.integrations.hf import KVKitCache
from kvkit.models import smollm2
from kvkit.testing import shipped_text


@pytest.fixture(scope="module")
def smol():
    path = smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    kv = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, ref, kv


def run(smol, chars, new_tokens):
    tok, ref, kv = smol
    ids = tok(shipped_text(chars), return_tensors="pt").input_ids
    expected = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    got = kv.generate(ids, past_key_values=KVKitCache(kv, "dense"), max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(got, expected), (got[0, ids.shape[1]:], expected[0, ids.shape[1]:])
    return ids.shape[1]


def test_dense_equals_transformers_short_prompt(smol):
    assert run(smol, 1200, 12) > 200


@pytest.mark.slow
def test_dense_equals_transformers_2k_prompt(smol):
    assert run(smol, 11000, 24) > 1900
