import json

import pytest

from kvkit import models


def test_embedded_model_is_a_plain_hf_folder():
    path = models.smollm2()
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    assert models.smollm2() == path  # converted once, reused
    assert models.resolve_model(None) == path and models.resolve_model(str(path)) == path


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("KVKIT_CACHE", str(tmp_path))

    def interrupted(gguf, out):
        (out / "config.json").write_text("{}")  # half written...
        raise KeyboardInterrupt  # ...then the user pressed Ctrl-C

    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2()
    assert list(tmp_path.iterdir()) == []


def test_resolve_model_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        models.resolve_model(tmp_path)
