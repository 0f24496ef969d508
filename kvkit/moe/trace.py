"""Routing traces: which experts each token used in each MoE layer, in arrival order.

A trace is what every other part of `kvkit.moe` consumes: the cache policies replay it, the
simulator prices it, batching regroups its requests. The Read-ME model (`kvkit.moe.readme`) writes traces
with `save_trace`; so can any other MoE model or an external tool via the CSV loader.

File format (`.npz`, written by `np.savez_compressed`, read with `allow_pickle=False`):

| key            | dtype / shape                 | meaning                                           |
|----------------|-------------------------------|---------------------------------------------------|
| experts        | int [tokens, layers, top_k]   | expert ids chosen by the router, token-major in   |
|                |                               | arrival order; each row sorted by gate weight,    |
|                |                               | highest first; ids in [0, num_experts), distinct  |
| request        | int [tokens]                  | request id of each token (>= 0)                   |
| predicted      | int [tokens, layers, k'] opt. | pre-gating prediction of `experts`, -1 padded     |
| lookahead      | int scalar                    | how early `predicted` is known (unit below)       |
| lookahead_unit | str scalar                    | "layers" or "tokens"                              |
| meta           | str scalar (JSON object)      | num_experts, top_k, expert_bytes, model, ...      |
|                |                               | (`gate_ranked: false` marks rows not in gate      |
|                |                               | order; low-bit scheduling then refuses the trace) |
| format_version | int scalar                    | 1                                                 |

Lookahead, precisely. Execution is flattened token-major: layer `l` of token `t` is *step*
`s = t * layers + l`. `predicted[t, l]` becomes known at step

* `lookahead_unit == "layers"`: `s - lookahead` (`lookahead=1`: one MoE layer ahead, as an
  ExpertFlow/MoE-Infinity style predictor that reads layer l-1's hidden state);
* `lookahead_unit == "tokens"`: `(t - lookahead) * layers`, i.e. at the start of token
  `t - lookahead`, for all layers of token t at once. Read-ME's pre-gating router, which runs
  before the backbone of a token, is `lookahead=0, unit="tokens"` in decode; prompts known in
  advance (prefill, queued requests) allow `lookahead >= 1`.

Availability is clipped at step 0 (tokens at the start of a trace are predicted from the start).
`Trace.available_step(t, l)` computes it; nothing else in kvkit interprets `lookahead`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
LOOKAHEAD_UNITS = ("layers", "tokens")
REQUIRED_META = ("num_experts", "top_k", "expert_bytes", "model")
# Replay keeps per-expert state ([layers, num_experts] arrays), so num_experts is bounded before
# anything is allocated. 2**20 is above any MoE model's experts per layer (PEER's million included).
MAX_EXPERTS = 1 << 20

__all__ = [
    "Trace",
    "TraceError",
    "save_trace",
    "load_trace",
    "load_csv_trace",
    "FORMAT_VERSION",
    "LOOKAHEAD_UNITS",
]


class TraceError(ValueError):
    """A trace (in memory or on disk) does not follow the format in `kvkit.moe.trace`."""


def _int_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TraceError(f"trace.{name} must be an integer array, got dtype {arr.dtype}; "
                         f"convert with .astype(np.int64)")
    if arr.ndim != ndim:
        raise TraceError(f"trace.{name} must have {ndim} dims, got shape {list(arr.shape)}")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class Trace:
    """Expert routing of a sequence of tokens. Shapes: T tokens, L MoE layers, K top_k.

    experts:   [T, L, K] int, ids in [0, num_experts), distinct within a row, highest gate first.
    request:   [T] int >= 0, the request each token belongs to.
    predicted: [T, L, K'] int or None; -1 pads rows with fewer than K' predictions.
    lookahead: how early predictions are known; see the module docstring for the unit.
    meta:      dict with num_experts, top_k, expert_bytes (bytes of one expert's weights),
               model (str); other JSON-serialisable keys are kept.
    lookahead_unit: "layers" (default) or "tokens".

    Raises:
        TraceError: on any inconsistency, saying which field and what to do.
    """

    experts: np.ndarray
    request: np.ndarray
    predicted: np.ndarray | None = None
    lookahead: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    lookahead_unit: str = "layers"

    def __post_init__(self) -> None:
        experts = _int_array("experts", self.experts, 3)
        request = _int_array("request", self.request, 1)
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "request", request)
        missing = [k for k in REQUIRED_META if k not in self.meta]
        if missing:
            raise TraceError(f"trace.meta lacks {missing}; it needs {list(REQUIRED_META)} "
                             f"(e.g. meta={{'num_experts': 64, 'top_k': 6, "
                             f"'expert_bytes': 2**20, 'model': 'name'}})")
        meta = dict(self.meta)
        for key in ("num_experts", "top_k", "expert_bytes"):
            if not isinstance(meta[key], (int, np.integer)) or isinstance(meta[key], bool) \
                    or meta[key] < 1:
                raise TraceError(f"trace.meta[{key!r}] must be an int >= 1, got {meta[key]!r}")
            meta[key] = int(meta[key])
        if meta["num_experts"] > MAX_EXPERTS:
            raise TraceError(f"trace.meta['num_experts'] = {meta['num_experts']} is more experts per "
                             f"layer than kvkit replays ({MAX_EXPERTS}); the ids in this trace go up "
                             f"to {int(experts.max()) if experts.size else None}: fix num_experts")
        if not isinstance(meta["model"], str):
            raise TraceError(f"trace.meta['model'] must be a string, got {meta['model']!r}")
        object.__setattr__(self, "meta", meta)
        tokens, layers, top_k = experts.shape
        if tokens < 1 or layers < 1:
            raise TraceError(f"trace.experts is empty (shape {list(experts.shape)}); "
                             f"record at least one token of one layer")
        if top_k != meta["top_k"]:
            raise TraceError(f"trace.experts has top_k={top_k} in its last dim but "
                             f"meta['top_k']={meta['top_k']}; they must agree")
        num_experts = meta["num_experts"]
        if experts.min() < 0 or experts.max() >= num_experts:
            bad = np.argwhere((experts < 0) | (experts >= num_experts))[0].tolist()
            raise TraceError(f"trace.experts[{bad[0]}, {bad[1]}, {bad[2]}] = "
                             f"{experts[tuple(bad)]} is outside [0, num_experts={num_experts})")
        if top_k > 1:
            srt = np.sort(experts, axis=-1)
            dup = np.argwhere((srt[..., 1:] == srt[..., :-1]).any(-1))
            if len(dup):
                t, l = dup[0].tolist()
                raise TraceError(f"trace.experts[{t}, {l}] = {experts[t, l].tolist()} repeats an "
                                 f"expert; a router picks top_k distinct experts")
        if request.shape != (tokens,):
            raise TraceError(f"trace.request must be [tokens] = [{tokens}], "
                             f"got {list(request.shape)}")
        if request.min() < 0:
            raise TraceError("trace.request ids must be >= 0")
        if self.predicted is not None:
            pred = _int_array("predicted", self.predicted, 3)
            if pred.shape[:2] != (tokens, layers) or pred.shape[2] < 1:
                raise TraceError(f"trace.predicted must be [tokens, layers, k'] = "
                                 f"[{tokens}, {layers}, k'>=1], got {list(pred.shape)}")
            if pred.min() < -1 or pred.max() >= num_experts:
                raise TraceError(f"trace.predicted ids must be in [0, {num_experts}) or -1 "
                                 f"(padding), got range [{pred.min()}, {pred.max()}]")
            object.__setattr__(self, "predicted", pred)
        if self.lookahead_unit not in LOOKAHEAD_UNITS:
            raise TraceError(f"trace.lookahead_unit must be one of {LOOKAHEAD_UNITS}, "
                             f"got {self.lookahead_unit!r}")
        if not isinstance(self.lookahead, (int, np.integer)) or self.lookahead < 0:
            raise TraceError(f"trace.lookahead must be an int >= 0, got {self.lookahead!r}")
        object.__setattr__(self, "lookahead", int(self.lookahead))

    # -- shape helpers -------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def expert_bytes(self) -> int:
        return int(self.meta["expert_bytes"])

    def available_step(self, token: int | np.ndarray, layer: int | np.ndarray) -> np.ndarray:
        """Step (`token * layers + layer`) from which `predicted[token, layer]` is known."""
        token, layer = np.asarray(token), np.asarray(layer)
        if self.lookahead_unit == "layers":
            step = token * self.num_layers + layer - self.lookahead
        else:
            step = (token - self.lookahead) * self.num_layers
        return np.maximum(step, 0)

    def slice_tokens(self, start: int, stop: int) -> "Trace":
        """The tokens [start, stop) as a new trace (same meta and lookahead)."""
        pred = None if self.predicted is None else self.predicted[start:stop]
        return Trace(self.experts[start:stop], self.request[start:stop], pred, self.lookahead,
                     dict(self.meta), self.lookahead_unit)

    def with_predictions(self, predicted: np.ndarray | None, lookahead: int,
                         lookahead_unit: str = "layers") -> "Trace":
        """The same routing with other predictions (validated like the constructor)."""
        return Trace(self.experts, self.request, predicted, lookahead, dict(self.meta),
                     lookahead_unit)


def save_trace(path: str | Path, trace: Trace) -> Path:
    """Write `trace` to `path` (`.npz` appended if missing) with `np.savez_compressed`."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays: dict[str, np.ndarray] = {
        "experts": trace.experts,
        "request": trace.request,
        "lookahead": np.asarray(trace.lookahead, dtype=np.int64),
        "lookahead_unit": np.asarray(trace.lookahead_unit),
        "meta": np.asarray(json.dumps(trace.meta, sort_keys=True)),
        "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
    }
    if trace.predicted is not None:
        arrays["predicted"] = trace.predicted
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _scalar(data: Any, key: str, path: Path) -> Any:
    arr = data[key]
    if arr.shape != ():
        raise TraceError(f"{path}: '{key}' must be a scalar, got shape {list(arr.shape)}")
    return arr.item()


def load_trace(path: str | Path) -> Trace:
    """Read and validate a `.npz` trace written by `save_trace`.

    Raises:
        FileNotFoundError: no file at `path`.
        TraceError: the file is not a valid trace; the message names the key and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no trace at {path}; write one with kvkit.moe.trace.save_trace "
                                f"or convert a CSV with load_csv_trace")
    if path.is_dir():
        raise TraceError(f"{path} is a folder; give a trace file (.npz or .csv)")
    with path.open("rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise TraceError(f"{path}: not an .npz archive (no zip header); write traces with "
                             f"kvkit.moe.trace.save_trace")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise TraceError(f"{path}: cannot be read without pickle ({err}); store plain int "
                         f"arrays and meta as a JSON string") from err
    except Exception as err:  # zipfile.BadZipFile, OSError, ...
        raise TraceError(f"{path}: not an .npz archive ({type(err).__name__}: {err})") from err
    with data:
        keys = set(data.files)
        missing = sorted({"experts", "request", "meta"} - keys)
        if missing:
            raise TraceError(f"{path}: missing keys {missing}; a trace has experts, request, "
                             f"meta (and optionally predicted, lookahead, lookahead_unit)")
        version = int(_scalar(data, "format_version", path)) if "format_version" in keys else 1
        if version != FORMAT_VERSION:
            raise TraceError(f"{path}: format_version {version} is not supported "
                             f"(this kvkit reads {FORMAT_VERSION})")
        try:
            experts, request = data["experts"], data["request"]
            predicted = data["predicted"] if "predicted" in keys else None
        except ValueError as err:
            raise TraceError(f"{path}: an array is stored as Python objects ({err}); "
                             f"store int arrays") from err
        raw_meta = _scalar(data, "meta", path)
        if not isinstance(raw_meta, str):
            raise TraceError(f"{path}: 'meta' must be a JSON string, got {type(raw_meta).__name__}")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as err:
            raise TraceError(f"{path}: 'meta' is not valid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise TraceError(f"{path}: 'meta' must be a JSON object, got {type(meta).__name__}")
        lookahead = int(_scalar(data, "lookahead", path)) if "lookahead" in keys else 0
        unit = str(_scalar(data, "lookahead_unit", path)) if "lookahead_unit" in keys else "layers"
    if predicted is None and lookahead:
        raise TraceError(f"{path}: lookahead={lookahead} but no 'predicted' array")
    try:
        return Trace(experts, request, predicted, lookahead, meta, unit)
    except TraceError as err:
        raise TraceError(f"{path}: {err}") from err


def load_csv_trace(path: str | Path, *, num_experts: int | None = None,
                   expert_bytes: int = 1, model: str = "unknown",
                   sep: str | None = None) -> Trace:
    """Read a CSV with columns `layer, token, experts` (and optionally `request`).

    `experts` holds a token's experts at that layer, highest gate first, separated by
    spaces, ';' or '|' (or `sep`). Layer and token ids are renumbered densely in sorted order;
    every (token, layer) pair must appear exactly once with the same number of experts.
    `num_experts` defaults to max id + 1 (pass the model's value when some experts never appear).
    Tokens without a `request` column all belong to request 0.

    Raises:
        FileNotFoundError, TraceError: missing file, missing columns, bad or missing rows.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no CSV trace at {path}")
    if path.is_dir():
        raise TraceError(f"{path} is a folder; give a CSV trace file")
    rows: dict[tuple[int, int], list[int]] = {}
    req_of: dict[int, int] = {}
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = cols
            need = {"layer", "token", "experts"}
            if not need <= set(cols):
                raise TraceError(f"{path}: CSV needs columns {sorted(need)}, found {cols}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    layer, token = int(row["layer"]), int(row["token"])
                    text = row["experts"].strip()
                    parts = text.split(sep) if sep else text.replace(";", " ").replace("|", " ").split()
                    ids = [int(x) for x in parts if x.strip()]
                except (TypeError, ValueError) as err:
                    raise TraceError(f"{path}:{lineno}: cannot parse {row!r} ({err}); layer and "
                                     f"token are ints, experts a list like '3 17 42'") from err
                if bad := [i for i in ids if not 0 <= i < MAX_EXPERTS]:
                    raise TraceError(f"{path}:{lineno}: expert id {bad[0]} is outside [0, {MAX_EXPERTS}); "
                                     f"ids count experts of one layer from 0")
                if (token, layer) in rows:
                    raise TraceError(f"{path}:{lineno}: token {token} layer {layer} appears twice")
                rows[(token, layer)] = ids
                if "request" in cols and row.get("request") not in (None, ""):
                    try:
                        req_of[token] = int(row["request"])
                    except ValueError as err:
                        raise TraceError(f"{path}:{lineno}: request {row['request']!r} is not an "
                                         f"int") from err
                    if not 0 <= req_of[token] < 2**63:
                        raise TraceError(f"{path}:{lineno}: request {req_of[token]} is outside "
                                         f"[0, 2**63)")
    except (UnicodeDecodeError, csv.Error) as err:
        raise TraceError(f"{path}: not a readable CSV text file ({err})") from err
    if not rows:
        raise TraceError(f"{path}: no rows")
    tokens = sorted({t for t, _ in rows})
    layers = sorted({l for _, l in rows})
    widths = {len(v) for v in rows.values()}
    if len(widths) != 1:
        raise TraceError(f"{path}: rows have different numbers of experts {sorted(widths)}; "
                         f"every row needs top_k experts")
    top_k = widths.pop()
    if top_k == 0:
        raise TraceError(f"{path}: rows list no experts")
    experts = np.full((len(tokens), len(layers), top_k), -1, dtype=np.int64)
    t_idx = {t: i for i, t in enumerate(tokens)}
    l_idx = {l: i for i, l in enumerate(layers)}
    for (t, l), ids in rows.items():
        experts[t_idx[t], l_idx[l]] = ids
    if (experts < 0).all(-1).any():
        t, l = np.argwhere((experts < 0).all(-1))[0].tolist()
        raise TraceError(f"{path}: token {tokens[t]} has no row for layer {layers[l]}; "
                         f"every token needs every layer")
    if num_experts is None:
        num_experts = int(experts.max()) + 1
    request = np.array([req_of.get(t, 0) for t in tokens], dtype=np.int64)
    meta = {"num_experts": int(num_experts), "top_k": top_k, "expert_bytes": int(expert_bytes),
            "model": model, "source": str(path.name)}
    try:
        return Trace(experts, request, None, 0, meta)
    except TraceError as err:
        raise TraceError(f"{path}: {err}") from err
