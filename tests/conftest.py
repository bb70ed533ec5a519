"""Every test process computes as every cherrytop command does (`run.cpu_kernels=avx2`, train/host.py):
PyTorch's AVX2 CPU kernels on x86, chosen here before any op runs, and inherited by the torchrun and
Ray workers the tests start. Tests that call a command in-process then find the kernels already
chosen as it asks, and in-process and worker results round alike on AVX-512 machines too."""

import os
import platform

if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
