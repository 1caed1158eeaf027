"""The command line every host emulator in tools/ shares: build the emulator in a work
directory, run its cases (a line each, as they finish), count the failures, clean up.

Each ``tools/emulate_*.py`` supplies what is its own (the build, the cases and their checks)
and calls :func:`drive` from its ``main``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# (exe, work directory, quick) -> (passed, report line) per run
Runs = Callable[[Path, Path, bool], Iterable[tuple[bool, str]]]


def drive(argv: list[str] | None, doc: str | None, prefix: str,
          build: Callable[[Path], Path], runs: Runs,
          quick_help: str = "edge cases only, no random ones") -> int:
    """Parse ``--quick`` / ``--keep DIR``, build, run, print ``N passed, M failed in Ts``;
    exit status 1 on any failure."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        exe = build(work)
        failures = total = 0
        for ok, line in runs(exe, work, args.quick):
            print(line, flush=True)
            failures += not ok
            total += 1
        print(f"{total - failures} passed, {failures} failed "
              f"in {time.perf_counter() - start:.1f}s")
        return 1 if failures else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
