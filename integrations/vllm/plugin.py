"""The `vllm.general_plugins` entry point: read the kvkit policy and put kvkit's attention backend
behind vLLM's CPU_ATTN member.

vLLM calls `register()` in every process it starts (API server, engine core, workers), maybe more
than once, so it is idempotent. It reads `KVKIT_POLICY` (or `KVKIT_CONFIG`, the same thing under
the name a config file suggests; setting both to different values is an error):

- unset or empty: nothing is registered and vLLM runs stock (installing kvkit changes nothing);
- a policy name (`dense`, `quest`), a JSON object (`{"name": "quest", "params": {"budget": 256}}`
  or a full `Policy.to_config()`), or the path of a JSON file holding one.

A policy that does not parse, or that uses a part the vLLM backend cannot run yet, raises here:
vLLM calls general plugins without catching, so a bad config stops start-up instead of silently
running stock. (An *import* error of this module is only logged by vLLM; the tests therefore
always assert that the kvkit backend is the one in use.)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kvkit.errors import ConfigError
from kvkit.policies import FullSelector, NoEvictor, PlainCodec, Policy

logger = logging.getLogger(__name__)

ENV = "KVKIT_POLICY"
ENV_ALIAS = "KVKIT_CONFIG"
BACKEND_PATH = "kvkit.integrations.vllm.backend.KVKitCPUAttentionBackend"

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

    Runs now: selectors `full` and `quest` (per layer: every KV head of a layer must use the same
    selector), no eviction, the plain codec. Eviction (vLLM KV cache specs) and kvkit codecs are
    later steps of issue 6.
    """
    from kvkit.policies.selectors.quest import QuestSelector

    for comp in policy.components():
        kind = type(comp)
        if kind in (FullSelector, QuestSelector, NoEvictor, PlainCodec):
            continue
        raise NotImplementedError(
            f"kvkit's vLLM backend does not run {kind.__name__} (policy {policy.name!r}) yet; it "
            "runs the selectors full and quest with no eviction and the plain codec")
    for rule in policy.rules:
        if rule.heads is not None and rule.selector is not None:
            raise NotImplementedError(
                "kvkit's vLLM backend selects per layer: a rule with `heads` and a selector "
                f"({rule}) is not supported yet")


def active_policy() -> Policy | None:
    """The policy `register()` installed in this process, or None (vLLM runs stock)."""
    return _registered


def register() -> None:
    """Entry point of `vllm.general_plugins`: install kvkit's CPU attention backend when
    `$KVKIT_POLICY` names a policy. Idempotent."""
    global _registered
    policy = load_policy()
    if policy is None:
        logger.info("kvkit: %s is unset; vLLM runs stock (no kvkit backend)", ENV)
        return
    if _registered is not None:
        if _registered.to_config() != policy.to_config():
            raise RuntimeError(f"kvkit: already registered policy {_registered.name!r} in this "
                               f"process; {ENV} now names {policy.name!r}")
        return

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
    _registered = policy
    logger.warning("kvkit: policy %r active; vLLM's CPU_ATTN backend is now %s (pid %d)",
                   policy.name, BACKEND_PATH, os.getpid())
