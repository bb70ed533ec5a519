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
