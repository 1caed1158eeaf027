#!/usr/bin/env bash
# Everything a fresh GPU machine needs, in one go: record the device and versions, build vidconv
# with its CUDA kernels (no network: the torch already installed is the one built against), run
# the nvcc/ptxas check, the GPU tests, and every benchmark present, writing logs and JSON into
# the directory given. A failing step is recorded and the rest still run; the exit status is
# non-zero if any step failed.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Knobs: TORCH_CUDA_ARCH_LIST (default: setup.py's "8.0;9.0a"), MAX_JOBS (default: CPU count),
# GPU_CHECK_TIMEOUT (seconds per step, default 1800), GPU_CHECK_SKIP_BUILD=1 (reuse an install),
# DALI_WHEELS (a folder of wheels: nvidia-dali-cuda130 and its deps, installed from there when
# DALI is missing, since a GPU machine may have no network; default ./.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
[ $# -ge 1 ] || { echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
out=$(cd "$1" && pwd)
limit=${GPU_CHECK_TIMEOUT:-1800}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export PIP_ROOT_USER_ACTION=ignore
py=python3
status=0
: > "$out/summary.txt"

# step NAME CMD...: run CMD with a time limit, output to NAME.log, one summary line.
step() {
  local name=$1
  shift
  local t0=$SECONDS rc=0
  echo "== $name: $*" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  if [ $rc -eq 0 ]; then
    echo "   ok ($((SECONDS - t0)) s)" | tee -a "$out/summary.txt"
  else
    echo "   FAILED rc=$rc ($((SECONDS - t0)) s), last lines of $out/$name.log:" |
      tee -a "$out/summary.txt"
    tail -n 15 "$out/$name.log" | sed 's/^/   | /' | tee -a "$out/summary.txt"
    status=1
  fi
  return $rc
}

# has_flag SCRIPT FLAG: whether the benchmark's --help lists FLAG (scripts differ in options).
has_flag() { "$py" "$1" --help 2>/dev/null | grep -q -- "$2"; }

# ---- device and versions ----------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
  "$py" - <<'EOF'
import json, platform, torch
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    "cuda_available": torch.cuda.is_available(),
}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1))
print(json.dumps(info, indent=2))
EOF
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"

# ---- build ---------------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]; then
  step build "$py" -m pip install --no-build-isolation --no-deps -v .
fi
# Imported from outside the source tree, so the installed package (with its CUDA kernels) is the
# one checked; tests and benchmarks below import it the same way (neither puts the repo root on
# sys.path: pytest's entry point adds tests/, a script adds its own directory).
step build_info bash -c "cd / && $py -c '
import vidconv, torch
info = vidconv.build_info()
print(vidconv.__file__)
print(info)
assert info.has_cuda_kernels, \"vidconv was built without CUDA kernels\"
assert torch.cuda.is_available(), \"torch sees no CUDA device\"
'"
tee -a "$out/versions.txt" < "$out/build_info.log" > /dev/null

if command -v nvcc > /dev/null; then
  step check_cuda bash tools/check_cuda.sh "$out/ptxas"
  step emulate_st_conv "$py" tools/emulate_st_conv.py
  step emulate_st_conv_sm90 "$py" tools/emulate_st_conv_sm90.py
fi

# ---- DALI (GPU decode): install from local wheels when missing ------------------------------
if ! "$py" -c "import nvidia.dali" > /dev/null 2>&1; then
  wheels=${DALI_WHEELS:-$repo/.whl}
  if ls "$wheels"/nvidia_dali_cuda*.whl > /dev/null 2>&1; then
    step dali_install "$py" -m pip install --no-index --find-links "$wheels" --no-deps \
      "$wheels"/*.whl
  else
    echo "== dali: not installed and no wheels in $wheels; DALI GPU tests will be skipped" |
      tee -a "$out/summary.txt"
  fi
fi

# ---- GPU tests -------------------------------------------------------------------------------
step pytest_cuda pytest -m cuda -q -rs --junitxml="$out/pytest-cuda.xml" tests
# All-skipped is a pass to pytest but not here: the GPU tests must have run.
if ! grep -Eq "[0-9]+ passed" "$out/pytest_cuda.log"; then
  echo "   FAILED: no GPU test passed (all skipped?)" | tee -a "$out/summary.txt"
  status=1
fi

# ---- benchmarks: each one present, with the flags it has ---------------------------------------
bench() {  # bench NAME [extra args...]: benchmarks/NAME.py on CUDA, JSON into $out
  local name=$1 script="benchmarks/$1.py"
  shift
  if [ ! -f "$script" ]; then
    echo "== $name: not present, skipped" | tee -a "$out/summary.txt"
    return 0
  fi
  local args=()
  has_flag "$script" "--device" && args+=(--device cuda)
  has_flag "$script" "--json" && args+=(--json "$out/$name.json")
  step "bench_$name" "$py" "$script" "${args[@]}" "$@"
}
bench preprocess
if [ -f benchmarks/preprocess.py ]; then
  step bench_preprocess_channels_last "$py" benchmarks/preprocess.py --device cuda \
    --channels-last --json "$out/preprocess-channels-last.json"
fi
bench conv
bench speed
bench loader
# the small-scale paper grid last: minutes on a GPU, and the other numbers come first
bench paper_tables --quick --out-dir "$out" --work-dir "${TMPDIR:-/tmp}/vidconv-paper-tables" \
  --no-progress

echo "== results in $out" | tee -a "$out/summary.txt"
ls -1 "$out" | sed 's/^/   /'
exit $status
