"""The Read-ME MoE model: a dense Llama whose MLPs are cut into experts, with three routers.

``ReadMEMLP`` replaces a ``LlamaMLP``. It holds the experts stacked (``w_gate``/``w_up`` [E, m, H],
``w_down`` [E, H, m]) plus optional always-on shared neurons, and computes only the experts a
token is routed to (a loop over experts, each on the tokens that chose it). Selected experts are
summed without weights: they are slices of one dense FFN, so with every expert active the output
is the dense output (up to float summation order).

Routing modes (``ReadME.set_router``):
- ``oracle``: the top-k experts by activation mass of the dense FFN on this very input (an upper
  bound: it computes every expert's activations to decide);
- ``layer``: a small per-layer router on the MLP input, distilled from the oracle;
- ``pregate``: Read-ME's pre-gating router, one network on token embeddings and the recent
  tokens that predicts every layer's experts before the backbone runs (so they are known ahead);
- ``all``: every expert (dense compute through the expert path).

Shapes: B batch, T tokens, N = B*T, H hidden, E experts, m neurons per expert, k top-k, L layers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvkit.moe.readme.extract import check_partition, check_sizes

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ROUTERS = ("oracle", "layer", "pregate", "all")
FORMAT = "kvkit-readme-moe"
VERSION = 1


@dataclass(frozen=True)
class MoEConfig:
    """How a dense model becomes an MoE. Validated here and against the model in ``check``."""
    num_experts: int = 8
    top_k: int = 6
    shared_neurons: int = 0          # always-on neurons taken out of the experts
    router: str = "oracle"           # default routing mode, one of ROUTERS
    layer_router_hidden: int = 128   # per-layer router MLP width (0: a linear router)
    pregate_window: int = 8          # tokens the pre-gating router sees (current + W-1 before)
    pregate_width: int = 512         # pre-gating router width

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], "
                             f"got {self.top_k}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; known: {', '.join(ROUTERS)}")
        if self.shared_neurons < 0:
            raise ValueError(f"shared_neurons must be >= 0, got {self.shared_neurons}")
        if self.layer_router_hidden < 0 or self.pregate_window < 1 or self.pregate_width < 1:
            raise ValueError("layer_router_hidden >= 0, pregate_window >= 1 and "
                             "pregate_width >= 1 are required")

    def check(self, intermediate_size: int) -> int:
        """Validate against the FFN width; return m, the neurons per expert."""
        return check_sizes(intermediate_size, self.num_experts, self.shared_neurons)

    def active_fraction(self, intermediate_size: int) -> float:
        """Share of FFN neurons a token uses: (s + k*m) / I."""
        m = self.check(intermediate_size)
        return (self.shared_neurons + self.top_k * m) / intermediate_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        known = [f.name for f in fields(cls)]
        if unknown := sorted(set(d) - set(known)):
            raise ValueError(f"MoEConfig does not take {unknown}; it takes {known}")
        return cls(**d)


class LayerRouter(nn.Module):
    """Per-layer router: MLP input [N, H] -> expert logits [N, E]."""

    def __init__(self, hidden: int, num_experts: int, width: int = 128) -> None:
        super().__init__()
        self.net = (nn.Linear(hidden, num_experts) if width == 0 else
                    nn.Sequential(nn.Linear(hidden, width), nn.GELU(),
                                  nn.Linear(width, num_experts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreGatingRouter(nn.Module):
    """Read-ME's pre-gating router: token embeddings of the current and W-1 previous tokens ->
    expert logits of every layer, before the backbone runs.

    A causal convolution of width W over normalised, projected embeddings, then an MLP.
    ``forward(emb [B, T, H], ctx [B, c, H] | None) -> [B, T, L, E]``; ``ctx`` holds the embeddings
    just before ``emb`` (decode), and zeros stand in before the sequence start, so a full-sequence
    call and token-by-token calls give the same logits.
    """

    def __init__(self, hidden: int, num_layers: int, num_experts: int, window: int = 8,
                 width: int = 512) -> None:
        super().__init__()
        self.num_layers, self.num_experts, self.window = num_layers, num_experts, window
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, width)
        self.conv = nn.Conv1d(width, width, kernel_size=window)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                  nn.Linear(width, num_layers * num_experts))

    def forward(self, emb: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = emb.shape
        seq = emb if ctx is None else torch.cat([ctx, emb], dim=1)  # [B, c+T, H]
        z = self.proj(self.norm(seq))  # [B, c+T, W]
        pad = max(0, self.window - 1 - (seq.shape[1] - t))  # zeros only before the start
        z = nn.functional.pad(z.transpose(1, 2), (pad, 0))  # [B, W, pad+c+T]
        z = self.conv(z).transpose(1, 2)[:, -t:] + self.proj(self.norm(emb))  # [B, T, W]
        return self.head(z).reshape(b, t, self.num_layers, self.num_experts)


class ReadMEMLP(nn.Module):
    """One MoE FFN cut from a dense SwiGLU MLP; computes only the routed experts."""

    def __init__(self, hidden: int, neurons: torch.Tensor, shared: torch.Tensor, act_fn: nn.Module,
                 top_k: int, router_width: int = 128) -> None:
        super().__init__()
        e, m = neurons.shape
        s = shared.numel()
        self.num_experts, self.top_k, self.act_fn = e, top_k, act_fn
        self.register_buffer("neurons", neurons.long().clone())  # [E, m] dense neuron ids
        self.register_buffer("shared", shared.long().clone())    # [s]
        self.w_gate = nn.Parameter(torch.empty(e, m, hidden))
        self.w_up = nn.Parameter(torch.empty(e, m, hidden))
        self.w_down = nn.Parameter(torch.empty(e, hidden, m))
        self.s_gate = nn.Parameter(torch.empty(s, hidden))
        self.s_up = nn.Parameter(torch.empty(s, hidden))
        self.s_down = nn.Parameter(torch.empty(hidden, s))
        self.router = LayerRouter(hidden, e, router_width)
        self.mode = "oracle"
        self.pending: torch.Tensor | None = None  # [N, k] set by the pre-gating hook
        self.record = False
        self.last_routing: torch.Tensor | None = None  # [N, k] when record

    @torch.no_grad()
    def load_dense(self, mlp: nn.Module) -> None:
        """Copy the expert slices out of a dense ``LlamaMLP``."""
        g, u, d = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        self.w_gate.copy_(g[self.neurons])                    # [E, m, H]
        self.w_up.copy_(u[self.neurons])                      # [E, m, H]
        self.w_down.copy_(d[:, self.neurons].permute(1, 0, 2))  # [H, E, m] -> [E, H, m]
        self.s_gate.copy_(g[self.shared])
        self.s_up.copy_(u[self.shared])
        self.s_down.copy_(d[:, self.shared])

    def expert_mass(self, x: torch.Tensor) -> torch.Tensor:
        """Oracle scores: each expert's activation mass ``sum_j |h_j| * ||down_j||``: [N, E]."""
        h = self.act_fn(torch.einsum("nh,emh->nem", x, self.w_gate)) * torch.einsum(
            "nh,emh->nem", x, self.w_up)  # [N, E, m]
        return (h.abs() * self.w_down.norm(dim=1)).sum(-1)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Expert ids per token, best first: [N, k] (all E in ``all`` mode)."""
        n = x.shape[0]
        if self.mode == "all":
            return torch.arange(self.num_experts).expand(n, -1)
        if self.mode == "oracle":
            return self.expert_mass(x).topk(self.top_k, dim=-1).indices
        if self.mode == "layer":
            return self.router(x).topk(self.top_k, dim=-1).indices
        if self.mode == "pregate":
            if self.pending is None or self.pending.shape[0] != n:
                raise RuntimeError("pre-gating routing missing: call the model through "
                                   "ReadME (its hook routes every layer from the input ids)")
            return self.pending
        raise ValueError(f"unknown router mode {self.mode!r}; known: {', '.join(ROUTERS)}")

    def experts_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sparse compute: shared neurons plus, for each expert, only its tokens. [N, H]."""
        n, k = idx.shape
        if self.shared.numel():
            out = (self.act_fn(x @ self.s_gate.T) * (x @ self.s_up.T)) @ self.s_down.T
        else:
            out = x.new_zeros(x.shape)
        flat = idx.reshape(-1)  # [N*k]
        order = flat.argsort(stable=True)
        tokens = torch.arange(n, device=x.device).repeat_interleave(k)[order]  # grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        lo = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            t = tokens[lo:lo + c]
            lo += c
            xe = x[t]  # [c, H]
            h = self.act_fn(xe @ self.w_gate[e].T) * (xe @ self.w_up[e].T)  # [c, m]
            out = out.index_add(0, t, h @ self.w_down[e].T)
        return out

    def masked_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Reference: the dense computation of every expert, masked to the routed ones. [N, H]."""
        mask = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype)
        mask.scatter_(1, idx, 1.0)  # [N, E]
        h = self.act_fn(torch.einsum("nh,emh->nem", x, self.w_gate)) * torch.einsum(
            "nh,emh->nem", x, self.w_up)  # [N, E, m]
        out = torch.einsum("nem,ehm->nh", h * mask[:, :, None], self.w_down)
        if self.shared.numel():
            out = out + (self.act_fn(x @ self.s_gate.T) * (x @ self.s_up.T)) @ self.s_down.T
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # [N, H]
        idx = self.route(xf)
        if self.record:
            self.last_routing = idx.detach().clone()
        if self.training and torch.is_grad_enabled():
            # Fine-tuning: the masked dense form gives the same output (tested) and its
            # backward is a few large matmuls instead of E small gathers and scatters.
            return self.masked_forward(xf, idx).reshape(shape)
        return self.experts_forward(xf, idx).reshape(shape)


def _mlps(model: PreTrainedModel) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


class ReadME:
    """A transformers causal LM turned MoE, plus its pre-gating router.

    ``readme.model`` is the transformers model (``generate`` works); ``readme.set_router(name)``
    picks the routing; ``save``/``load`` keep it as a folder (JSON + safetensors).
    """

    def __init__(self, model: PreTrainedModel, config: MoEConfig, base_model: str,
                 partition: tuple[torch.Tensor, torch.Tensor]) -> None:
        neurons, shared = partition  # [L, E, m], [L, s]
        cfg = model.config
        m = config.check(cfg.intermediate_size)
        num_layers = cfg.num_hidden_layers
        if neurons.shape != (num_layers, config.num_experts, m) or shared.shape != (
                num_layers, config.shared_neurons):
            raise ValueError(f"partition must be [L, E, m] = [{num_layers}, {config.num_experts},"
                             f" {m}] and shared [L, s] = [{num_layers}, {config.shared_neurons}],"
                             f" got {list(neurons.shape)} and {list(shared.shape)}")
        for i in range(num_layers):
            check_partition(neurons[i], shared[i], cfg.intermediate_size)
        self.config, self.base_model, self.model = config, str(base_model), model
        self.expert_weights_changed = False
        self.routers_trained: list[str] = []
        self.meta: dict[str, Any] = {}
        for i, layer in enumerate(model.model.layers):
            dense = layer.mlp
            moe = ReadMEMLP(cfg.hidden_size, neurons[i], shared[i], dense.act_fn, config.top_k,
                            config.layer_router_hidden)
            moe.load_dense(dense)
            layer.mlp = moe.to(dense.down_proj.weight.dtype)
        self.pregate = PreGatingRouter(cfg.hidden_size, num_layers, config.num_experts,
                                       config.pregate_window, config.pregate_width)
        self.pregate.to(next(model.parameters()).dtype)
        self._ctx: torch.Tensor | None = None
        self._hook = model.model.register_forward_pre_hook(self._pregate_hook, with_kwargs=True)
        self.mode = ""
        self.set_router(config.router)

    # -- routing ---------------------------------------------------------------------------
    @property
    def mlps(self) -> list[ReadMEMLP]:
        return _mlps(self.model)

    def set_router(self, mode: str, top_k: int | None = None) -> None:
        """Route with ``mode`` (oracle | layer | pregate | all), optionally another top-k.

        Raises:
            ValueError: unknown mode, or top_k outside [1, E].
        """
        if mode not in ROUTERS:
            raise ValueError(f"unknown router {mode!r}; known: {', '.join(ROUTERS)}")
        k = self.config.top_k if top_k is None else top_k
        if not 1 <= k <= self.config.num_experts:
            raise ValueError(f"top_k must be in [1, {self.config.num_experts}], got {k}")
        if mode in ("layer", "pregate") and mode not in self.routers_trained:
            logger.warning("router %r is untrained; its routing is random", mode)
        self.mode, self.top_k = mode, k
        for mlp in self.mlps:
            mlp.mode, mlp.top_k, mlp.pending = mode, k, None

    def _pregate_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.mode != "pregate":
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise NotImplementedError("pre-gating routing needs input_ids (not inputs_embeds)")
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        emb = module.embed_tokens(ids)  # [B, T, H]
        ctx = self._ctx if past > 0 and self._ctx is not None else None
        with torch.no_grad():
            logits = self.pregate(emb, ctx)  # [B, T, L, E]
        idx = logits.topk(self.top_k, dim=-1).indices  # [B, T, L, k]
        full = emb if ctx is None else torch.cat([ctx, emb], dim=1)
        self._ctx = full[:, -(self.config.pregate_window - 1):].detach() if (
            self.config.pregate_window > 1) else full[:, :0]
        for i, mlp in enumerate(self.mlps):
            mlp.pending = idx[:, :, i].reshape(-1, self.top_k)
        return None

    def predict(self, input_ids: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """Pre-gating predictions for a whole sequence: [B, T, L, k] expert ids, best first."""
        with torch.no_grad():
            logits = self.pregate(self.model.model.embed_tokens(input_ids))
        return logits.topk(top_k or self.config.top_k, dim=-1).indices

    # -- accounting ------------------------------------------------------------------------
    def active_params(self) -> dict[str, int]:
        """Parameters touched per token: the backbone outside the FFNs, shared neurons, k experts
        and the router in use (the embedding table counted once, as a lookup)."""
        cfg, c = self.model.config, self.config
        m = c.check(cfg.intermediate_size)
        per_neuron = 3 * cfg.hidden_size
        mlp_params = sum(p.numel() for mlp in self.mlps for n, p in mlp.named_parameters()
                         if not n.startswith("router."))
        other = sum(p.numel() for p in self.model.parameters()) - mlp_params - sum(
            p.numel() for mlp in self.mlps for p in mlp.router.parameters())
        router = {"layer": sum(p.numel() for mlp in self.mlps for p in mlp.router.parameters()),
                  "pregate": sum(p.numel() for p in self.pregate.parameters())}.get(self.mode, 0)
        k = self.top_k
        active_mlp = cfg.num_hidden_layers * per_neuron * (c.shared_neurons + k * m)
        return {"ffn_dense": mlp_params, "ffn_active": active_mlp, "other": other,
                "router": router, "total_dense": other + mlp_params,
                "total_active": other + active_mlp + router}

    # -- persistence -----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, mlp in enumerate(self.mlps):
            out[f"layers.{i}.neurons"] = mlp.neurons
            out[f"layers.{i}.shared"] = mlp.shared
            for n, p in mlp.router.named_parameters():
                out[f"layers.{i}.router.{n}"] = p.detach()
            if self.expert_weights_changed:
                for n in ("w_gate", "w_up", "w_down", "s_gate", "s_up", "s_down"):
                    out[f"layers.{i}.{n}"] = getattr(mlp, n).detach()
        for n, p in self.pregate.state_dict().items():
            out[f"pregate.{n}"] = p.detach()
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, path: str | Path) -> Path:
        """Write ``readme_config.json`` + ``readme.safetensors`` into the folder ``path``.

        The backbone is not copied: the config names the base model folder, and expert weights
        are stored only when fine-tuning changed them (otherwise they are sliced from the base).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.model.config
        doc = {"format": FORMAT, "version": VERSION, "moe": asdict(self.config),
               "base_model": self.base_model,
               "base": {"num_hidden_layers": cfg.num_hidden_layers,
                        "hidden_size": cfg.hidden_size,
                        "intermediate_size": cfg.intermediate_size},
               "routers_trained": sorted(self.routers_trained),
               "expert_weights": "stored" if self.expert_weights_changed else "base",
               "meta": self.meta}
        save_file(self.state_tensors(), str(path / "readme.safetensors"))
        (path / "readme_config.json").write_text(json.dumps(doc, indent=2) + "\n")
        return path

    @classmethod
    def from_dense(cls, base_model: str | Path, config: MoEConfig,
                   partition: tuple[torch.Tensor, torch.Tensor],
                   dtype: torch.dtype = torch.float32) -> ReadME:
        """Load the dense model from ``base_model`` and cut it with ``partition``."""
        from kvkit.models import load_causal_lm

        model = load_causal_lm(str(base_model), dtype)
        return cls(model, config, str(base_model), partition)

    @classmethod
    def load(cls, path: str | Path, base_model: str | Path | None = None,
             dtype: torch.dtype = torch.float32) -> ReadME:
        """Load a folder written by ``save``; ``base_model`` overrides the recorded base folder.

        Raises:
            ValueError: not a kvkit Read-ME folder, wrong version, a base model of another shape,
                missing or unexpected tensors, or a corrupt partition.
        """
        from safetensors.torch import load_file

        from kvkit.models import load_config

        path = Path(path)
        cfg_file = path / "readme_config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{path} is not a Read-ME MoE folder (no readme_config.json)")
        doc = json.loads(cfg_file.read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ValueError(f"{cfg_file}: expected format {FORMAT!r} version {VERSION}, got "
                             f"{doc.get('format')!r} version {doc.get('version')}")
        if missing := [k for k in ("moe", "base_model", "base") if k not in doc]:
            raise ValueError(f"{cfg_file} lacks {missing}; rewrite the folder with `kvkit moe extract`")
        config = MoEConfig.from_dict(doc["moe"])
        base = str(base_model or doc["base_model"])
        hf = load_config(base)
        for key, want in doc["base"].items():
            if getattr(hf, key) != want:
                raise ValueError(f"base model {base} has {key}={getattr(hf, key)}, the MoE was "
                                 f"cut from one with {want}")
        tensors = load_file(str(path / "readme.safetensors"))
        num_layers = hf.num_hidden_layers
        try:
            neurons = torch.stack([tensors.pop(f"layers.{i}.neurons") for i in range(num_layers)])
            shared = torch.stack([tensors.pop(f"layers.{i}.shared") for i in range(num_layers)])
        except KeyError as exc:
            raise ValueError(f"{path}: missing partition tensor {exc}") from None
        moe = cls.from_dense(base, config, (neurons, shared), dtype=dtype)
        expected = set(moe.state_tensors()) - {f"layers.{i}.{n}" for i in range(num_layers)
                                               for n in ("neurons", "shared")}
        if doc["expert_weights"] == "stored":
            expected |= {f"layers.{i}.{n}" for i in range(num_layers)
                         for n in ("w_gate", "w_up", "w_down", "s_gate", "s_up", "s_down")}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"{path}: tensors do not match the config; missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        with torch.no_grad():
            for i, mlp in enumerate(moe.mlps):
                for n, p in list(mlp.named_parameters()):
                    key = f"layers.{i}.{n}"
                    if key in tensors:
                        if tensors[key].shape != p.shape:
                            raise ValueError(f"{path}: {key} is {list(tensors[key].shape)}, "
                                             f"expected {list(p.shape)}")
                        p.copy_(tensors[key])
            moe.pregate.load_state_dict(
                {k.removeprefix("pregate."): v for k, v in tensors.items()
                 if k.startswith("pregate.")})
        moe.expert_weights_changed = doc["expert_weights"] == "stored"
        moe.routers_trained = list(doc["routers_trained"])
        moe.meta = dict(doc.get("meta", {}))
        moe.set_router(config.router)
        return moe
