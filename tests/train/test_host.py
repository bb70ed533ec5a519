"""train/host.py: the process set-up every command gets (threads, the allocator keeping freed memory)."""

import subprocess
import sys

import pytest

from cherrytop.config import load_config

FAULTS = """
import resource, sys, torch
from cherrytop.train import host
took = host.keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.ones(16 << 20)  # 64 MiB (above glibc's largest default mmap threshold), written, freed
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()  # warm-up: the first allocation page-faults in either case
print(took, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is what this tunes")
def test_keep_freed_memory_stops_refaulting_freed_tensors():
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])
    took, kept = run("keep")
    _, default = run("default")
    assert took == "True"
    # default glibc: each 64 MiB block is mmapped and unmapped, so 10 rounds fault ~10 x 16,384 pages in
    assert default > 10 * 16384 * 0.9
    assert kept < 200  # kept: the block is reused from the heap, already resident


def test_configure_applies_the_thread_count():
    import torch
    before = torch.get_num_threads()
    try:
        from cherrytop.train import host
        host.configure(load_config("test", overrides=["--run.threads=1", "--run.keep_freed_memory=false"]).run)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


KERNELS = """
import sys, torch
from cherrytop.config import load_config
from cherrytop.train import host
run = load_config("test", overrides=["--run.cpu_kernels=" + sys.argv[1], "--run.keep_freed_memory=false"]).run
host.configure(run)
import os
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("TORCHINDUCTOR_CACHE_DIR", "-"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Linux CI machines")
def test_cpu_kernels_pins_the_avx2_kernels_unless_told_otherwise():
    """`run.cpu_kernels=avx2` (the default) runs PyTorch's AVX2 kernels on any x86 CPU with AVX2, an
    AVX-512 one too (where `native` would pick AVX512), with torch.compile's cache in a folder of its
    own; a user's own ATEN_CPU_CAPABILITY wins."""
    import os
    import platform

    import torch
    if platform.machine() != "x86_64" or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("needs an x86 CPU with AVX2")

    def capability(setting: str, **env) -> str:
        clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR")}
        got, cache = subprocess.run([sys.executable, "-c", KERNELS, setting], capture_output=True, text=True, check=True,
                                    env={**clean, **env}).stdout.split()
        assert cache.endswith("_avx2") if setting == "avx2" and not env else cache == "-"  # asked for by cherrytop
        return got
    native = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            capture_output=True, text=True, check=True,
                            env={k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}).stdout.strip()
    assert capability("avx2") == "AVX2"
    assert capability("native") == native  # AVX512 on a Zen 4 or a Xeon, AVX2 on Zen 1-3
    assert capability("avx2", ATEN_CPU_CAPABILITY="default") == "DEFAULT"
