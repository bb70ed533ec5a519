"""The host process every command runs in: PyTorch's CPU kernel set, torch's CPU threads, and how the
C allocator treats freed memory.

PyTorch picks the widest vectorised kernels the CPU has (AVX-512 on a Zen 4 or a Xeon, AVX2 on Zen 1-3)
once, at the first op that needs them; the two sets round differently (reductions, softmax, norms), and
the tiny recipe is sensitive enough that the same seed then trains other models. `run.cpu_kernels=avx2`
(the default) sets ATEN_CPU_CAPABILITY before that first op, so every x86 machine with AVX2 computes
the same numbers. It also gives torch.compile's on-disk cache a folder of its own: that cache does not
tell the kernel sets apart, and code cached under AVX-512 gave NaN log-probs when read under AVX2
(torch 2.13, `ppo.compile_decode=on` on a Zen 4; `3b57a7d`, 2026-11-24).

glibc's malloc hands blocks above its mmap threshold (128 KiB to 32 MiB, adjusted as it goes) to the
kernel on every free and trims the top of its heap, so a training step that allocates the same
activations, gradients and vocabulary-sized logits again and again page-faults them in again, one
4 KiB page at a time. `keep_freed_memory` raises the mmap threshold to 1 GiB and stops trimming, so
freed blocks are reused: the process's resident memory stays at its peak instead of falling back
between steps. On the 2-core CPU (Zen 3) it halved the minor page faults of a 5-iteration run of the
PPO benchmark (314k -> 158k; user CPU 26.8 -> 24.1 s in that pair of runs), though the benchmark's
PPO rate moved less than its ±10 % run-to-run noise (`cacffbc`, 2026-11-23: bench/RESULTS.md, Table 7).
PyTorch's CPU tuning guide gets the same from jemalloc or tcmalloc, which would be an extra native dependency.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import platform
import sys
import tempfile
import warnings

from cherrytop.config import RunConfig

M_TRIM_THRESHOLD = -1
"""mallopt parameter: free memory at the top of the heap kept before it is returned to the OS."""
M_MMAP_THRESHOLD = -3
"""mallopt parameter: requests at least this large are served by mmap and unmapped on free."""
MMAP_THRESHOLD = 1 << 30
"""Blocks below 1 GiB come from the heap and stay there for reuse when freed."""


def configure(run: RunConfig) -> None:
    """Apply `run.cpu_kernels`, `run.threads` and `run.keep_freed_memory` to this process."""
    cpu_kernels(run.cpu_kernels)
    if run.threads:
        import torch  # here, so commands that never touch torch do not pay for importing it
        torch.set_num_threads(run.threads)
    if run.keep_freed_memory:
        keep_freed_memory()


def cpu_kernels(setting: str) -> str | None:
    """Ask for PyTorch's AVX2 kernels (`avx2`, on x86 only) or leave its choice (`native`), unless the
    user set ATEN_CPU_CAPABILITY. Returns the kernel set asked for or in use (None when nothing was
    asked); warns when an imported PyTorch had already chosen another (an op ran before this call)."""
    if setting != "avx2" or "ATEN_CPU_CAPABILITY" in os.environ or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # inductor's default folder, one per kernel set
        user = "".join(c if c.isalnum() else "_" for c in getpass.getuser())
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_avx2")
    torch = sys.modules.get("torch")  # not imported yet: no op has run, PyTorch will choose as asked
    if torch is None:  # (and commands that never touch torch do not pay for importing it)
        return "AVX2"
    got = torch.backends.cpu.get_cpu_capability()
    if got not in ("AVX2", "DEFAULT"):  # DEFAULT: a CPU without AVX2, nothing to match
        warnings.warn(f"run.cpu_kernels=avx2 came too late: PyTorch already runs its {got} kernels in this process",
                      stacklevel=2)
    return got


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (module docstring). Returns whether it took effect:
    False off Linux, or under a C library without glibc's `mallopt` (musl), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
