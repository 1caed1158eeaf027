#!/usr/bin/env bash
# Compile every CUDA kernel file (csrc/cuda/*_kernel.cu: CUDA runtime only, no torch) with plain
# nvcc for sm_80 and sm_90a, warnings as errors, and fail on any register spill in ptxas' report.
# Usage: tools/check_cuda.sh [report-dir]   (ptxas reports are kept there when given)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvcc >/dev/null || { echo "check_cuda: nvcc not found" >&2; exit 1; }
out=${1:-$(mktemp -d)}
mkdir -p "$out"
archs=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
status=0
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
  echo "ok  $f"
done
exit $status
