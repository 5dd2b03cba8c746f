"""Training runs under jemalloc where the system has it.

TensorFlow on CPU allocates and frees its activation tensors every step. Under
glibc's malloc the large ones come from fresh ``mmap`` pages that are zeroed
by a page fault each time (TensorFlow's generator dataset also lowers
``M_TRIM_THRESHOLD`` to 128 kB, so freed heap memory goes back to the kernel
too). On a 2-core host a third of a detector run's CPU time went to the
kernel's page faults (37 million in 4 short epochs); under jemalloc told
never to hand freed pages back (``MALLOC_CONF=dirty_decay_ms:-1,
muzzy_decay_ms:-1``) the run took 1.1 million faults and its epochs about half
the time (docs/neu_det_detector.md, "Training speed"). The losses are the same to
the last digit: only the allocator changes. The price is that the process
keeps its peak memory (about 2 GB for the detector recipe) until it ends.

A training entry point calls :func:`reexec_under_jemalloc` before anything
else; when ``libjemalloc.so.2`` is installed (Debian: ``libjemalloc2``) and
not yet loaded, the command starts again with it in ``LD_PRELOAD`` and
:data:`MALLOC_CONF` (unless ``MALLOC_CONF`` is already set). Set
``STATION_TRAIN_MALLOC=system`` to keep the system allocator.

``python -m export.alloc`` prints the allocator a training run gets here.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path
from typing import Sequence

ENV = "STATION_TRAIN_MALLOC"  # "system": never re-exec
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages: no page fault to reuse them
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
             "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_jemalloc() -> Path | None:
    """The path of the system's jemalloc shared library, or None."""
    name = ctypes.util.find_library("jemalloc")  # e.g. "libjemalloc.so.2", from the ldconfig cache
    for candidate in ([name] if name else []) + ["libjemalloc.so.2", "libjemalloc.so"]:
        for d in _LIB_DIRS:
            path = Path(d) / candidate
            if path.is_file():
                return path
    return None


def loaded_allocator() -> str:
    """``"jemalloc <path> (MALLOC_CONF …)"`` when this process has jemalloc mapped, else ``"system"``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for line in maps.splitlines():
        if "libjemalloc" in line:
            return f"jemalloc {line.split()[-1]} (MALLOC_CONF {os.environ.get('MALLOC_CONF', '')!r})"
    return "system"


def reexec_under_jemalloc(module: str | None = None, argv: Sequence[str] | None = None) -> None:
    """Start ``python -m module argv…`` again (by default the running ``-m`` module with
    its arguments) with jemalloc preloaded, if it is installed and neither loaded nor
    refused (``STATION_TRAIN_MALLOC=system``); otherwise return.

    Call it only from a ``__main__`` block: it replaces the running process."""
    if os.environ.get(ENV, "").lower() == "system":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or loaded_allocator() != "system":
        return
    lib = find_jemalloc()
    if lib is None:
        return
    if module is None:
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:  # run as a file, not with -m: nothing to restart
            return
        module = spec.name
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, LD_PRELOAD=":".join(p for p in (str(lib), preload) if p))
    env.setdefault("MALLOC_CONF", MALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)


def main() -> int:
    print(loaded_allocator())
    return 0


if __name__ == "__main__":
    reexec_under_jemalloc()
    sys.exit(main())
