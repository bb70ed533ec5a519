"""A run killed with SIGKILL in the middle (tests/stages/test_rl_algorithms.py, test_ppo_ray.py): a
`cherrytop` command in a process of its own, killed as soon as its checkpoint reaches an iteration."""

import os
import signal
import subprocess
import sys
import time

import torch


def _poll_state(ckpt, least: int, proc, timeout: float = 300) -> int:
    """Wait until the checkpoint in `ckpt` is of iteration `least` or later (read as a copy, without the
    clean-up `load_state` does, which is the resumed run's job); its iteration."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it was killed"
        try:
            it = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)["iteration"]
        except Exception:  # noqa: BLE001 (not there yet, or being replaced)
            it = 0
        if it >= least:
            return it
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint of iteration {least} in {ckpt}")


def kill_after_checkpoint(args: list[str], ckpt, least: int = 2, new_session: bool = False) -> None:
    """`cherrytop` with `args` in a process of its own, killed with SIGKILL (no clean-up of any kind) as
    soon as its checkpoint `ckpt` is of iteration `least`: it is killed in the middle of the run, often
    in the middle of its next checkpoint. `new_session`: the process and what it starts (Ray's) in a
    process group of their own, killed together."""
    proc = subprocess.Popen([sys.executable, "-m", "cherrytop.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)
    try:
        _poll_state(ckpt, least, proc)
    except AssertionError:
        raise AssertionError(proc.communicate()[1][-3000:]) from None
    finally:
        if new_session:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
