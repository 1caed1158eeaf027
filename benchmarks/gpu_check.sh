#!/usr/bin/env bash
# One device call on a lent GPU machine: build, GPU tests, compute-sanitizer, quick benchmarks,
# within one time budget (default 480 s), at most 8 files in OUT, a summary table printed last.
# `--dry-run` runs every step's CPU part anywhere (the tests do). See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--budget S] [--skip STEP,...] OUT
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
