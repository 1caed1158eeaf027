#!/usr/bin/env bash
# Compile every CUDA kernel file (csrc/cuda/*_kernel.cu: CUDA runtime only, no torch) with plain
# nvcc for sm_80 and sm_90a, warnings as errors, and fail on any register spill in ptxas' report.
# Kernel files that issue wgmma must also show HGMMA in their sm_90a SASS (cuobjdump, from the
# nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm wheels or a CUDA toolkit; skipped with a message
# when absent), so a guard that compiled the Hopper path away cannot pass.
# Usage: tools/check_cuda.sh [report-dir]   (ptxas reports are kept there when given)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda: nvcc not found" >&2; exit 1; }
out=${1:-$(mktemp -d)}
mkdir -p "$out"
archs=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
status=0
# cuobjdump needs nvdisasm beside it or on PATH; the pip wheels put both in nvidia/cu*/bin.
cuobjdump_bin=$(command -v cuobjdump || true)
if [ -z "$cuobjdump_bin" ]; then
  cuobjdump_bin=$(python3 - <<'PY' 2>/dev/null || true
import glob, os, site
dirs = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for d in dirs for p in glob.glob(os.path.join(d, "nvidia", "cu*", "bin", "cuobjdump"))]
print(hits[0] if hits else "")
PY
)
fi
shopt -s nullglob
files=(csrc/cuda/*_kernel.cu)
[ ${#files[@]} -gt 0 ] || { echo "check_cuda: no csrc/cuda/*_kernel.cu files" >&2; exit 1; }
for f in "${files[@]}"; do
  name=$(basename "$f" .cu)
  log="$out/$name.ptxas.txt"
  if ! nvcc -std=c++17 -O3 -c "$f" -o "$out/$name.o" -Icsrc "${archs[@]}" \
      -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror -Xptxas -v,-warn-spills,-warn-lmem-usage \
      >"$log" 2>&1; then
    cat "$log"; echo "check_cuda: FAILED to compile $f" >&2; status=1; continue
  fi
  spills=$(grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" || true)
  if [ -n "$spills" ]; then
    echo "check_cuda: register spills in $f:" >&2; echo "$spills" >&2; status=1
  fi
  # one line per kernel and arch: registers, shared memory, stack, spills
  awk '/Compiling entry function/ {match($0, /_Z[A-Za-z0-9_]+/); fn=substr($0, RSTART, RLENGTH)}
       /for .sm_/ {match($0, /sm_[0-9a]+/); arch=substr($0, RSTART, RLENGTH)}
       /bytes stack frame/ {stack=$0}
       /Used [0-9]+ registers/ {sub(/.*ptxas info *: */, ""); print arch "\t" fn "\t" $0 " | " stack}' "$log" \
    | while IFS=$'\t' read -r arch fn regs; do
        name=$(echo "$fn" | c++filt | sed -E -e "s/^void //" -e 's/vidconv::cuda::(\(anonymous namespace\)::)?//g' -e "s/\\([^()]*\\)$//")
        printf "  %-8s %-70.70s %s\n" "$arch" "$name" "${regs//ptxas info    : /}"
      done
  if grep -q "wgmma.mma_async" "$f"; then
    if [ -z "$cuobjdump_bin" ]; then
      echo "check_cuda: cuobjdump not found, skipping the HGMMA check of $f" \
           '(pip install ".[kernel-check]")' >&2
    else
      hgmma=$(PATH="$(dirname "$cuobjdump_bin"):$PATH" "$cuobjdump_bin" -sass -arch sm_90a \
              "$out/$name.o" | grep -c "HGMMA" || true)
      if [ "${hgmma:-0}" -eq 0 ]; then
        echo "check_cuda: no HGMMA in the sm_90a SASS of $f" >&2; status=1
      else
        echo "  sm_90a   $hgmma HGMMA instructions in the SASS"
      fi
    fi
  fi
  echo "ok  $f"
done
exit $status
