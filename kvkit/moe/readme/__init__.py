"""Read-ME (arXiv:2410.19123) on the embedded model: a dense Llama becomes an MoE.

``calib`` cuts text that ships with the machine into token chunks and profiles the dense MLPs;
``extract`` splits each MLP's neurons into equal experts by co-activation; ``model`` holds the
MoE (``ReadME``: sparse expert compute inside transformers, oracle / per-layer / pre-gating
routers, save/load as a folder); ``train`` distils the routers from the oracle and fine-tunes
the experts; ``evaluate`` measures perplexity, passkey and routing recall; ``tracing`` records
routing traces in ``kvkit.moe.trace`` format for the expert scheduler; ``cli`` adds
``kvkit moe extract | eval | trace``. ``pipeline`` strings extraction together.

Imports here are light (torch only); transformers loads when a model is built.
"""

from kvkit.moe.readme.model import ROUTERS, MoEConfig, PreGatingRouter, ReadME, ReadMEMLP

__all__ = ["ROUTERS", "MoEConfig", "PreGatingRouter", "ReadME", "ReadMEMLP"]
