"""vidconv.host_memory: huge pages for big CPU tensors (process-wide, so each case runs in a
fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vidconv import host_memory

LINUX_THP = sys.platform.startswith("linux") and host_memory._kernel_mode() in ("always",
                                                                                 "madvise")

# Runs in a fresh interpreter: the setting is read once per process.
PROBE = """
import json, os, resource, sys
import torch
from vidconv import host_memory
if sys.argv[1] == "late":
    torch.ones(3)  # any CPU tensor before the call: too late
why = host_memory.use_huge_pages()
env = os.environ.get("THP_MEM_ALLOC_ENABLE")
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 4
print(json.dumps({"why": why, "faults": faults, "on": host_memory.huge_pages_in_effect(),
                  "env": env}))
"""


def _meminfo() -> str:
    try:
        return Path("/proc/meminfo").read_text()
    except OSError:
        return ""


def _probe(when: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("THP_MEM_ALLOC_ENABLE", "VIDCONV_HUGE_PAGES")}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, when], env=environ, check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not LINUX_THP, reason="needs Linux with transparent huge pages on "
                                          "(always or madvise)")
def test_huge_pages_cut_the_page_faults_of_a_fresh_tensor():
    plain = _probe("early", VIDCONV_HUGE_PAGES="0")
    huge = _probe("early")
    assert plain["why"] == "turned off by VIDCONV_HUGE_PAGES=0" and not plain["on"]
    assert huge["why"] is None and huge["on"]
    pages = (64 << 20) // 4096
    if plain["faults"] < pages / 2:
        pytest.skip(f"this system faults {plain['faults']:.0f} pages per fresh 64 MiB tensor "
                    "already (another allocator?): nothing to compare")
    if huge["faults"] >= pages / 8 and "AnonHugePages:        0 kB" in _meminfo():
        pytest.skip("the kernel granted no huge page (fragmented memory?): "
                    f"{huge['faults']:.0f} faults per 64 MiB with them asked for")
    assert huge["faults"] < pages / 8 < plain["faults"]


@pytest.mark.skipif(not LINUX_THP, reason="needs Linux with transparent huge pages on")
def test_after_a_big_tensor_it_says_too_late():
    late = _probe("late")
    assert late["why"].startswith("too late: this process allocated a CPU tensor before")
    assert not late["on"] and late["env"] is None  # the environment left as it was


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_torch_setting_zero_is_respected():
    off = _probe("early", THP_MEM_ALLOC_ENABLE="0")
    assert off["why"] == "turned off by THP_MEM_ALLOC_ENABLE=0" and not off["on"]


def test_kernel_setting_never_and_other_systems(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("VIDCONV_HUGE_PAGES", raising=False)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(host_memory, "_THP_SETTING", setting)
    if sys.platform.startswith("linux"):
        assert "transparent huge pages are off" in host_memory.use_huge_pages()
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.use_huge_pages() == "needs Linux (this is darwin)"


def test_the_command_asks_for_them(monkeypatch):
    from vidconv import cli

    calls = []
    monkeypatch.setattr(host_memory, "use_huge_pages", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        cli.main(["train", "--no-such-option"])
    assert calls == []  # a bad command line stops before
    rc = cli.main(["compare", "/nonexistent/a.json", "/nonexistent/b.json"])
    assert rc != 0 and calls == [1]
