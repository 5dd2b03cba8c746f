"""export/alloc.py: training entry points restart under jemalloc when the system has it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from export.alloc import ENV, MALLOC_CONF, find_jemalloc

REPO = Path(__file__).resolve().parent.parent
JEMALLOC = find_jemalloc()


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", ENV)}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=dict(base, **env), capture_output=True,
                          text=True, timeout=120)


def test_system_allocator_on_request() -> None:
    out = _run("export.alloc", **{ENV: "system"})
    assert out.returncode == 0 and out.stdout.strip() == "system"


@pytest.mark.skipif(JEMALLOC is None, reason="libjemalloc.so.2 is not installed (Debian: libjemalloc2)")
def test_training_entry_points_restart_under_jemalloc(tmp_path: Path) -> None:
    want = f"jemalloc {JEMALLOC} (MALLOC_CONF {MALLOC_CONF!r})"
    out = _run("export.alloc")
    assert out.returncode == 0 and out.stdout.strip() == want
    # a MALLOC_CONF of the user's own is kept
    assert _run("export.alloc", MALLOC_CONF="narenas:1").stdout.strip() == f"jemalloc {JEMALLOC} (MALLOC_CONF 'narenas:1')"
    # a training command: the restarted process logs its allocator, then names the bad folder and exits 2
    out = _run("export.train_detector", str(tmp_path / "absent"), "--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"memory allocator: {want}" in out.stdout
    assert "absent: no images/ folder" in out.stdout
