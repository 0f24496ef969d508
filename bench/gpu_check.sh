#!/usr/bin/env bash
# gpu_check: the kernel tests compiled on CUDA, then the kernel benchmark, on a GPU machine as it
# comes (python3 with torch and triton preinstalled, no network, no pip install), in under 8 min.
#     bash bench/gpu_check.sh OUTDIR      # results: OUTDIR/{machine.json,kernel_tests.*,summary.*}
#                                         # and OUTDIR/kernels_*/kernels_cuda.{json,md}
# Commit a run's OUTDIR as bench/results/gpu/. Exit 0: every step passed; 1: a step failed;
# 2: usage; 3: no CUDA here. `--import-tree DIR` only builds and checks the import tree below.
#
# kvkit runs from this working tree: a temporary folder on PYTHONPATH holds `kvkit/`, a real
# folder of symlinks to every entry of the repo's kvkit/ plus `kernels -> triton_kernels/` and
# `integrations -> integrations/` (pyproject's package-dir mapping), so no code is copied or
# changed and the repo root itself is never on sys.path (a top-level `triton_kernels` there is
# what vLLM takes for OpenAI's package; tests/kernels/test_packaging.py checks it is not ours).
#
# Steps (each bounded by `timeout`, all of them by DEADLINE_S; a failed step does not stop the
# next ones; one summary line per step at the end):
#   0 machine.json: nvidia-smi, python/torch/triton versions, git sha, a hash of the kernels
#   1 CUDA present, else one line on stderr and exit 3 before anything long
#   2 import tree built and checked
#   3 tests/kernels with TRITON_INTERPRET=0 (the same tests CI runs interpreted, plus @gpu ones)
#   4 bench/kernels.py, bf16, budgets 1K/4K, batches 1/8/32: llama8b at 8K+32K, llama8b at 128K
#     (its own process: 4 copies of K/V = 32 GiB at batch 32, an OOM there loses only that run)
#     and smollm2 at 8K/32K/128K; dense is PyTorch SDPA or matmul (the faster) in the same
#     process, bandwidth as a share of the card's peak (bench/kernels.py's PEAK_BW).
# Caps: tests 200 s, benchmarks 90 + 90 + 75 s, each cut to what is left of DEADLINE_S (465 s);
# a bench run cut by its timeout writes nothing (bench/kernels.py writes at the end).
# GPU_CHECK_DRY=1 (tests/test_gpu_check.py, on CPU): no CUDA check, the interpreter, one small
# test file and a tiny grid on CPU: it checks the commands, not the kernels.

set -u

usage() {
    echo "usage: bash bench/gpu_check.sh OUTDIR    (or: bash bench/gpu_check.sh --import-tree DIR)" >&2
    exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-465}   # whole script; 8 min = 480 s
DRY=${GPU_CHECK_DRY:-0}

# Build $1/kvkit: symlinks to the repo's package folders, as pyproject's package-dir maps them.
build_import_tree() {
    local dir=$1 entry name
    mkdir -p "$dir/kvkit" || return 1
    for entry in "$REPO"/kvkit/*; do
        name=$(basename "$entry")
        [[ $name == __pycache__ ]] && continue   # Python writes the shim's own caches in $dir
        ln -sfn "$entry" "$dir/kvkit/$name" || return 1
    done
    ln -sfn "$REPO/triton_kernels" "$dir/kvkit/kernels" || return 1
    ln -sfn "$REPO/integrations" "$dir/kvkit/integrations" || return 1
}

# With PYTHONPATH=$1: kvkit and kvkit.kernels resolve into the repo, `triton_kernels` does not.
# Run from $1: `python3 -` puts its CWD on sys.path, and from the repo root that CWD would
# make `triton_kernels/` importable.
check_import_tree() {
    (cd "$1" && PYTHONPATH=$1 python3 - "$REPO" "$1") <<'EOF'
import importlib.util, sys
from pathlib import Path
repo, tree = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).absolute()
import kvkit, kvkit.attention, kvkit.kernels
assert Path(kvkit.__file__).parent == tree / "kvkit", f"kvkit comes from {kvkit.__file__}, not {tree}"
assert Path(kvkit.__file__).resolve() == repo / "kvkit" / "__init__.py", kvkit.__file__
assert Path(kvkit.kernels.__file__).resolve() == repo / "triton_kernels" / "__init__.py", kvkit.kernels.__file__
spec = importlib.util.find_spec("triton_kernels")
where = [] if spec is None else list(spec.submodule_search_locations or [spec.origin])
assert not any(Path(p).resolve().is_relative_to(repo) for p in where), f"triton_kernels is the repo's: {where}"
print(f"kvkit from {Path(kvkit.__file__).parent} -> {repo}/kvkit, kvkit.kernels -> {repo}/triton_kernels")
EOF
}

if [[ ${1:-} == --import-tree ]]; then
    [[ $# -eq 2 ]] || usage
    mkdir -p "$2" && dir=$(cd "$2" && pwd) || exit 2
    build_import_tree "$dir" && check_import_tree "$dir"
    exit $?
fi
[[ $# -eq 1 && ${1:-} != -* ]] || usage
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)

NAMES=() STATUS=() SECS=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); }

# run_step NAME CAP_S LOG CWD CMD...: CMD in CWD under `timeout`, output to LOG and stdout.
run_step() {
    local name=$1 cap=$2 log=$3 cwd=$4; shift 4
    local left=$((DEADLINE_S - SECONDS - 15))
    local t=$((cap < left ? cap : left))
    if ((t < 20)); then
        echo "gpu_check: $name: skipped, ${left}s left of ${DEADLINE_S}s" >&2
        record "$name" "SKIPPED (no time left)" 0
        return
    fi
    echo "== gpu_check: $name (at most ${t}s) -> ${log#"$OUT"/}"
    local start=$SECONDS rc
    (cd "$cwd" && timeout -k 5 "$t" "$@") 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) record "$name" PASS $((SECONDS - start)) ;;
        124 | 137) record "$name" "TIMEOUT after ${t}s" $((SECONDS - start)) ;;
        *) record "$name" "FAIL (exit $rc)" $((SECONDS - start)) ;;
    esac
}

# --- 0: the machine --------------------------------------------------------------------------
NVSMI_L="nvidia-smi not found" NVSMI_Q=""
if command -v nvidia-smi >/dev/null; then
    NVSMI_L=$(timeout 20 nvidia-smi -L 2>&1)
    NVSMI_Q=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory \
        --format=csv,noheader 2>&1)
fi
GIT_SHA=$(git -C "$REPO" rev-parse HEAD 2>/dev/null) || GIT_SHA=unknown
GIT_DIRTY=$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | wc -l)
KERNELS_SHA=$(cd "$REPO" && cat triton_kernels/*.py bench/kernels.py | sha256sum | cut -c1-16)
NVSMI_L=$NVSMI_L NVSMI_Q=$NVSMI_Q GIT_SHA=$GIT_SHA GIT_DIRTY=$GIT_DIRTY KERNELS_SHA=$KERNELS_SHA \
    timeout 60 python3 - "$OUT/machine.json" >"$OUT/machine.log" 2>&1 <<'EOF'
import datetime, json, os, platform, sys
m = {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
     "host": platform.node(), "platform": platform.platform(), "cores": os.cpu_count(),
     "python": platform.python_version(), "nvidia_smi_L": os.environ["NVSMI_L"].strip().splitlines(),
     "nvidia_smi_gpu": os.environ["NVSMI_Q"].strip().splitlines(),
     "git": os.environ["GIT_SHA"], "git_modified_files": int(os.environ["GIT_DIRTY"] or 0),
     "kernels_sha256_16": os.environ["KERNELS_SHA"]}
for mod in ("torch", "triton", "transformers", "numpy"):
    try:
        m[mod] = __import__(mod).__version__
    except Exception as e:  # record what is missing, keep going
        m[mod] = f"unavailable: {type(e).__name__}: {e}"
try:
    import torch
    m["torch_cuda"] = torch.version.cuda
    m["cuda_available"] = torch.cuda.is_available()
    if m["cuda_available"]:
        m["devices"] = [{"name": torch.cuda.get_device_name(i),
                         "memory_bytes": torch.cuda.get_device_properties(i).total_memory,
                         "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                        for i in range(torch.cuda.device_count())]
except Exception as e:
    m["cuda_error"] = f"{type(e).__name__}: {e}"
with open(sys.argv[1], "w") as f:
    json.dump(m, f, indent=1)
    f.write("\n")
EOF
[[ -s $OUT/machine.json ]] && echo "gpu_check: machine -> $OUT/machine.json" \
    || echo "gpu_check: could not write machine.json (see $OUT/machine.log)" >&2

# --- 1: CUDA, before anything long -----------------------------------------------------------
if [[ $DRY == 1 ]]; then
    record cuda "SKIPPED (GPU_CHECK_DRY=1)" 0
    GPU_NAME=cpu
else
    GPU_NAME=$(timeout 60 python3 -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())' \
        2>"$OUT/cuda_check.txt")
    if [[ $? -ne 0 ]]; then
        if timeout 60 python3 -c 'import torch' >/dev/null 2>&1; then
            echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run this on the GPU machine" >&2
        else
            echo "gpu_check: python3 cannot import torch (see $OUT/cuda_check.txt); run this on the GPU machine" >&2
        fi
        exit 3
    fi
    record cuda "PASS ($GPU_NAME)" 0
fi
case $GPU_NAME in   # bench/kernels.py's PEAK_BW key for its predicted_* columns
    *H200*) GPU_MODEL=H200 ;;
    *H100*PCIe*) GPU_MODEL="H100 PCIe" ;;
    *) GPU_MODEL="H100 SXM" ;;
esac

# --- 2: the import tree ----------------------------------------------------------------------
TREE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
trap 'rm -rf "$TREE"' EXIT   # removes the links, never what they point to
export PYTHONPATH=$TREE
if [[ $DRY == 1 ]]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
if build_import_tree "$TREE" && check_import_tree "$TREE" >"$OUT/import_tree.txt" 2>&1; then
    record import_tree PASS 0
    cat "$OUT/import_tree.txt"
else
    record import_tree FAIL 0
    cat "$OUT/import_tree.txt" >&2
fi

# --- 3: kernel tests, compiled ---------------------------------------------------------------
# `python3 -m pytest` puts its CWD on sys.path; from the repo root that makes `triton_kernels/`
# a top-level module (test_packaging.py would fail). So it runs from the import tree's folder
# (already on PYTHONPATH), with the repo's pyproject (`-c`, addopts --import-mode=importlib) and
# rootdir, which keeps node ids, conftest.py files and markers as in CI. The pytest executable
# is not used because the image may not put one on PATH; python3 is what the image guarantees.
# Deselected: two tests of the installed package, which run python in a subprocess without
# PYTHONPATH (kvkit is not installed here, only on PYTHONPATH); they are not about the GPU.
if [[ $DRY == 1 ]]; then TESTS=("$REPO/tests/kernels/test_packaging.py"); else TESTS=("$REPO/tests/kernels"); fi
run_step kernel_tests 200 "$OUT/kernel_tests.txt" "$TREE" \
    python3 -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" -q -p no:cacheprovider \
    --import-mode=importlib -rs --junitxml "$OUT/kernel_tests.xml" \
    --deselect tests/kernels/test_packaging.py::test_kvkit_kernels_is_the_triton_kernels_folder \
    --deselect tests/kernels/test_compile.py::test_kernels_compile_for_sm90 \
    "${TESTS[@]}"

# --- 4: kernel benchmark ---------------------------------------------------------------------
# bench/kernels.py writes kernels_{cuda,cpu}.{json,md} into --out; one folder per run.
if [[ $DRY == 1 ]]; then
    GRID=(--budgets 64 --batches 1 --warmup 1 --repeats 2 --cpu)
    CTX_SHORT=(256) CTX_LONG=(512) CTX_ALL=(256 512)
else
    GRID=(--budgets 1024 4096 --batches 1 8 32 --warmup 3 --repeats 20)
    CTX_SHORT=(8192 32768) CTX_LONG=(131072) CTX_ALL=(8192 32768 131072)
fi
bench() {  # NAME CAP_S GEOMETRY CONTEXTS...
    local name=$1 cap=$2 geometry=$3; shift 3
    run_step "$name" "$cap" "$OUT/$name.log" "$REPO" \
        python3 bench/kernels.py --geometry "$geometry" --contexts "$@" --dtype bf16 --page-size 16 \
        --gpu-model "$GPU_MODEL" --out "$OUT/$name" "${GRID[@]}"
}
bench kernels_llama8b 90 llama8b "${CTX_SHORT[@]}"
bench kernels_llama8b_128k 90 llama8b "${CTX_LONG[@]}"
bench kernels_smollm2 75 smollm2 "${CTX_ALL[@]}"

# --- summary ---------------------------------------------------------------------------------
rc=0
{
    echo "# gpu_check — $GPU_NAME, git ${GIT_SHA:0:12}, ${SECONDS}s"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} |"; done
    for md in "$OUT"/kernels_*/kernels_*.md; do
        [[ -f $md ]] && printf '\n## %s\n\n' "${md#"$OUT"/}" && cat "$md"
    done
} >"$OUT/summary.md"
{
    printf '{"gpu": "%s", "git": "%s", "dry": %s, "seconds": %d, "steps": [' \
        "$GPU_NAME" "$GIT_SHA" "$([[ $DRY == 1 ]] && echo true || echo false)" "$SECONDS"
    for i in "${!NAMES[@]}"; do
        ((i)) && printf ', '
        printf '{"step": "%s", "status": "%s", "seconds": %d}' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
    done
    printf ']}\n'
} >"$OUT/summary.json"
echo
for i in "${!NAMES[@]}"; do
    echo "gpu_check: ${NAMES[$i]}: ${STATUS[$i]} (${SECS[$i]}s)"
    [[ ${STATUS[$i]} == PASS* || ${STATUS[$i]} == "SKIPPED (GPU_CHECK_DRY=1)" ]] || rc=1
done
echo "gpu_check: $([[ $rc == 0 ]] && echo "all passed" || echo "FAILED") in ${SECONDS}s; $OUT/summary.md"
exit $rc
