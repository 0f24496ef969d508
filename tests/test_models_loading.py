"""Model folders load without running their code or unpickling weights, and bad ones are named."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import LlamaForCausalLM

from kvkit import evaluate, models
from kvkit.testing import tiny_llama_config

EVIL = "open({marker!r}, 'w').write('ran')\nfrom transformers import LlamaConfig as EvilConfig\n"


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(folder)
    return folder


def test_a_folders_own_code_never_runs(tiny, tmp_path):
    marker = tmp_path / "ran"
    (tiny / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((tiny / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (tiny / "config.json").write_text(json.dumps(config))
    model = models.load_causal_lm(models.resolve_model(tiny))  # the built-in Llama, not evil.py
    assert type(model) is LlamaForCausalLM and not marker.exists()
    del config["model_type"]  # only the folder's code could build it now: refused, not prompted
    (tiny / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json names no model_type"):
        models.resolve_model(tiny)
    with pytest.raises(ValueError, match="config.json: transformers cannot load it"):
        models.load_config(tiny)
    assert not marker.exists()


def test_pickle_weights_are_refused(tiny):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\); kvkit loads safetensors"):
        evaluate.load(tiny)


@pytest.mark.parametrize("text", ["{}", "[]", "{nope", "[" * 100_000])
def test_a_config_kvkit_cannot_use_is_named(tiny, text):
    (tiny / "config.json").write_text(text)
    with pytest.raises(ValueError, match=str(tiny / "config.json")):
        models.resolve_model(tiny)


def test_context_limit_reads_the_config(tiny):
    assert models.context_limit(tiny) == 1024
