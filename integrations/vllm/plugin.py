"""The `vllm.general_plugins` entry point: read the kvkit policy and put kvkit's attention backend
behind vLLM's CPU_ATTN member.

vLLM calls `register()` in every process it starts (API server, engine core, workers), maybe more
than once, so it is idempotent. The policy comes from one of:

- `KVKIT_POLICY` (or `KVKIT_CONFIG`, the same thing under the name a config file suggests;
  setting both to different values is an error);
- vLLM's `--additional-config '{"kvkit": ...}'` (`LLM(additional_config={"kvkit": ...})`),
  read when vLLM builds the attention layers (`ConfiguredBackend`).

Either holds a policy name (`dense`, `quest`), a JSON object (`{"name": "quest", "params":
{"budget": 256}}` or a full `Policy.to_config()`), or the path of a JSON file holding one.
Neither set: vLLM runs stock, with its own classes (installing kvkit changes nothing).

A policy that does not parse, or that uses a part the vLLM backend cannot run yet, raises here:
vLLM calls general plugins without catching, so a bad config stops start-up instead of silently
running stock. (An *import* error of this module is only logged by vLLM; the tests therefore
always assert that the kvkit backend is the one in use.)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from kvkit.errors import ConfigError
from kvkit.policies import FullSelector, NoEvictor, PlainCodec, Policy
from kvkit.policies.evictors.h2o import A2SFEvictor, H2OEvictor
from kvkit.policies.evictors.sink_window import SinkWindowEvictor
from kvkit.policies.selectors.quest import LServeSelector, QuestSelector

logger = logging.getLogger(__name__)

ENV = "KVKIT_POLICY"
ENV_ALIAS = "KVKIT_CONFIG"
CONFIG_KEY = "kvkit"  # vLLM's --additional-config '{"kvkit": ...}'
BACKEND_PATH = "kvkit.integrations.vllm.backend.KVKitCPUAttentionBackend"
CONFIGURED_PATH = f"{__name__}.ConfiguredBackend"

_registered: Policy | None = None


def load_policy(value: str | None = None) -> Policy | None:
    """The policy named by `value` (default: `$KVKIT_POLICY` or `$KVKIT_CONFIG`), validated;
    None when unset.

    Raises:
        ConfigError: not a known name, not valid JSON, or not a valid policy config.
        NotImplementedError: a policy part the vLLM backend does not run yet.
    """
    if value is None:
        policy_env, config_env = os.environ.get(ENV, "").strip(), os.environ.get(ENV_ALIAS, "").strip()
        if policy_env and config_env and policy_env != config_env:
            raise ConfigError(f"{ENV}={policy_env!r} and {ENV_ALIAS}={config_env!r} disagree; set one of them")
        value = policy_env or config_env
    raw = value.strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{ENV} is not valid JSON ({e}); give a policy name, a JSON object "
                              "such as '{\"name\": \"quest\", \"params\": {\"budget\": 256}}', "
                              "or the path of a JSON file") from e
        policy = Policy.from_config(cfg)
    elif raw.endswith(".json") or Path(raw).is_file():
        policy = Policy.from_file(raw)
    else:
        policy = Policy.from_config({"name": raw})
    check_supported(policy)
    return policy


def check_supported(policy: Policy) -> None:
    """Raise NotImplementedError for policy parts the vLLM backend cannot run yet.

    Runs now: selectors `full`, `quest` and `lserve` (per layer: every KV head of a layer must use
    the same selector), the `sink_window` evictor (`streaming`, DuoAttention: its blocks are freed in
    layers where every KV head streams, see streaming.py), the `h2o`/`a2sf` evictors on every
    layer and head with the full selector (whole blocks, through kvkit's KV connector: see
    eviction.py), the plain codec. kvkit's codecs do not run in vLLM yet (NOTES.md beside this file).
    """
    for comp in policy.components():
        kind = type(comp)
        if kind not in (FullSelector, QuestSelector, LServeSelector, NoEvictor, SinkWindowEvictor, PlainCodec,
                        A2SFEvictor, H2OEvictor):
            raise NotImplementedError(
                f"kvkit's vLLM backend does not run {kind.__name__} (policy {policy.name!r}) yet; it "
                "runs the selectors full, quest and lserve, the evictors none, sink_window, h2o and a2sf, "
                "and the plain codec")
        if isinstance(comp, A2SFEvictor) and comp.prefill != "end":
            raise NotImplementedError(
                f"kvkit's vLLM backend scores the prompt at its end and evicts at decode only; "
                f"{kind.__name__}(prefill={comp.prefill!r}) is not supported, use prefill='end'")
    for rule in policy.rules:
        if rule.heads is not None and rule.selector is not None:
            raise NotImplementedError(
                "kvkit's vLLM backend selects per layer: a rule with `heads` and a selector "
                f"({rule}) is not supported yet")
    if scores_blocks(policy) and any(not isinstance(c, (FullSelector, A2SFEvictor, PlainCodec))
                                     for c in policy.components()):
        raise NotImplementedError(
            f"kvkit's vLLM backend evicts whole blocks of every layer and KV head: policy "
            f"{policy.name!r} must combine h2o/a2sf with the full selector and no other evictor")


# `--kv-transfer-config` for score eviction: kvkit's KV connector (eviction.py) carries the
# evicted blocks from the workers to the scheduler
EVICTION_CONNECTOR = {"kv_connector": "KVKitEvictionConnector",
                      "kv_connector_module_path": "kvkit.integrations.vllm.eviction", "kv_role": "kv_both"}


def scores_blocks(policy: Policy) -> bool:
    """Whether the policy evicts blocks by score (h2o, a2sf), which needs kvkit's KV connector."""
    return any(isinstance(c, A2SFEvictor) for c in policy.components())


def frees_blocks(policy: Policy) -> bool:
    """Whether the policy's layers free KV blocks in vLLM (sink + window: streaming.py; h2o/a2sf:
    eviction.py), which needs prefix caching off."""
    return scores_blocks(policy) or any(isinstance(c, SinkWindowEvictor) for c in policy.components())


def active_policy() -> Policy | None:
    """The policy installed in this process, or None (vLLM runs stock)."""
    return _registered


def register() -> None:
    """Entry point of `vllm.general_plugins`. Idempotent.

    With `$KVKIT_POLICY` set: install kvkit's CPU attention backend now. Unset: point CPU_ATTN at
    `ConfiguredBackend`, which vLLM resolves when it builds the attention layers, with the
    engine's config current: kvkit's backend when `additional_config` has a "kvkit" entry, vLLM's
    own CPU backend class otherwise (unconfigured, vLLM runs stock).
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from kvkit.integrations.vllm import memory, requests

    requests.patch_validation()  # a bad extra_args["kvkit_budget"] is the client's error
    memory.patch_memory_planning()  # page summaries count against the KV budget (a no-op unconfigured)
    policy = load_policy()
    if policy is None:
        register_backend(AttentionBackendEnum.CPU_ATTN, CONFIGURED_PATH)
        _key_backend_cache_by_config()
        logger.info("kvkit: %s is unset; kvkit runs only if vLLM's additional_config has a "
                    "%r entry", ENV, CONFIG_KEY)
        return
    install(policy, f"${ENV}")
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)


def _key_backend_cache_by_config() -> None:
    """Make vLLM's cache of resolved attention backends tell engines with and without a kvkit
    entry apart. Idempotent.

    vLLM resolves a layer's backend class once per (backend, head size, dtype, ...) and caches
    it; the engine's additional_config is not in that key. A second engine built in the same
    process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) would then get the first engine's class: stock
    attention under a kvkit config, or kvkit's under none. The kvkit entry joins the key here.
    """
    from vllm.config import get_current_vllm_config_or_none
    from vllm.v1.attention import selector

    original = getattr(selector, "_cached_get_attn_backend", None)
    if getattr(original, "_kvkit", False):
        return
    if not hasattr(original, "__wrapped__"):  # another vLLM: leave it, one engine per process works
        logger.warning("kvkit: vLLM's attention-backend cache is not the one kvkit knows; build one "
                       "engine per process (vLLM's default) so each resolves its own backend")
        return

    @functools.cache
    def resolve(kvkit_entry: str, *args, **kwargs):
        return original.__wrapped__(*args, **kwargs)

    @functools.wraps(original)
    def cached_get_attn_backend(*args, **kwargs):
        extra = getattr(get_current_vllm_config_or_none(), "additional_config", None)
        entry = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
        return resolve(json.dumps(entry, sort_keys=True), *args, **kwargs)

    cached_get_attn_backend.cache_clear = resolve.cache_clear  # type: ignore[attr-defined]
    cached_get_attn_backend._kvkit = True  # type: ignore[attr-defined]
    selector._cached_get_attn_backend = cached_get_attn_backend


def install(policy: Policy, source: str) -> None:
    """Make `policy` this process's policy (once; a different second one is an error)."""
    global _registered
    if _registered is not None:
        if _registered.to_config() != policy.to_config():
            raise ConfigError(f"kvkit: policy {_registered.name!r} is already active in this "
                              f"process; {source} now names {policy.name!r}. Configure kvkit once "
                              f"(${ENV} or additional_config[{CONFIG_KEY!r}])")
        return
    if any(isinstance(c, SinkWindowEvictor) for c in policy.components()):
        from kvkit.integrations.vllm import streaming

        streaming.patch_attention_spec(policy)
    if scores_blocks(policy) or any(isinstance(c, QuestSelector | LServeSelector) for c in policy.components()):
        from kvkit.integrations.vllm import requests

        requests.publish_row_budgets()
    _registered = policy
    logger.warning("kvkit: policy %r (from %s) active; vLLM's CPU_ATTN backend is %s (pid %d)",
                   policy.name, source, BACKEND_PATH, os.getpid())


def policy_from_vllm_config(vllm_config) -> Policy | None:
    """The policy in `vllm_config.additional_config["kvkit"]` (a name, a policy config object,
    or a JSON file path, as for `$KVKIT_POLICY`), validated; None when absent."""
    extra = getattr(vllm_config, "additional_config", None)
    if not isinstance(extra, dict) or extra.get(CONFIG_KEY) is None:
        return None
    value = extra[CONFIG_KEY]
    if not isinstance(value, (str, dict)):
        raise ConfigError(f"additional_config[{CONFIG_KEY!r}] must be a policy name, a policy "
                          f"config object or a JSON file path, got {type(value).__name__}")
    return load_policy(value if isinstance(value, str) else json.dumps(value)) if value else None


def __getattr__(name: str):
    """`ConfiguredBackend`: the CPU attention backend class for the engine being built."""
    if name != "ConfiguredBackend":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm.config import get_current_vllm_config_or_none
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    policy = policy_from_vllm_config(get_current_vllm_config_or_none())
    if policy is None:
        return CPUAttentionBackend
    install(policy, f"additional_config[{CONFIG_KEY!r}]")
    from kvkit.integrations.vllm.backend import KVKitCPUAttentionBackend

    return KVKitCPUAttentionBackend
