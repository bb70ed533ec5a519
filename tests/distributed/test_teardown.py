"""`distributed.teardown` after an error: each rank waits (bounded) for the others before it
destroys its gloo group, so rank 0, which hosts the job's store, never leaves under a rank still
arriving (rank 0 leaving first aborted a CI run with "terminate called without an active exception")."""

import os
import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from cherrytop.train import distributed
    dist.init_process_group("gloo")
    rank, delay, wait_s, log = dist.get_rank(), float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    if rank == 1:
        time.sleep(delay)  # rank 1 reaches its error path late
        open(log, "a").write("1 arrives\\n")
    distributed.teardown(clean=False, wait_s=wait_s)
    open(log, "a").write(f"{rank} left\\n")
""")


def launch(tmp_path, delay: float, wait_s: float) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(delay), str(wait_s), str(log)],
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    return log.read_text().splitlines()


def test_rank_0_leaves_only_after_a_late_rank_arrived(tmp_path):
    lines = launch(tmp_path, delay=1.5, wait_s=60)
    assert lines.index("1 arrives") < lines.index("0 left")


def test_a_rank_that_never_arrives_costs_only_the_wait(tmp_path):
    lines = launch(tmp_path, delay=4, wait_s=0.5)  # rank 1 is "stuck" longer than rank 0 waits
    assert lines.index("0 left") < lines.index("1 arrives")
