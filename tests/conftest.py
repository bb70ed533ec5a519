"""Every test process computes as every cherrytop command does (`run.cpu_kernels=avx2`, through the
commands' own `train/host.cpu_kernels`): PyTorch's AVX2 CPU kernels on x86, chosen here before any op
runs, and inherited by the torchrun and Ray workers the tests start, with torch.compile's cache in the
AVX2 kernels' own folder. Tests that call a command in-process then find the kernels already chosen as
it asks, and in-process and worker results round alike on AVX-512 machines too."""

from cherrytop.train.host import cpu_kernels

cpu_kernels("avx2")
