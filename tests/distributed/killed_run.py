"""A run killed with SIGKILL in the middle (tests/stages/test_rl_algorithms.py, test_ppo_ray.py,
test_ppo_torchrun.py): a `cherrytop` command in a process of its own (or under torchrun), killed as soon
as its checkpoint reaches an iteration."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def _poll_state(ckpt, least: int, proc, timeout: float = 300) -> int:
    """Wait until the checkpoint in `ckpt` is of iteration `least` or later (read as a copy, without the
    clean-up `load_state` does, which is the resumed run's job); its iteration."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it was killed"
        try:
            state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
            it = state["iteration"] if "iteration" in state else state["step"]  # PPO's iterations, a loop stage's steps
        except Exception:  # noqa: BLE001 (not there yet, or being replaced)
            it = 0
        if it >= least:
            return it
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint of iteration {least} in {ckpt}")


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (Linux's /proc)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or the process is gone
            pass
    return [k for c in kids for k in (c, *_descendants(c))]


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie left unreaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_after_checkpoint(args: list[str], ckpt, least: int = 2, new_session: bool = False,
                          launcher: tuple[str, ...] = ("-m", "cherrytop.cli")) -> None:
    """`cherrytop` with `args` in a process of its own, killed with SIGKILL (no clean-up of any kind) as
    soon as its checkpoint `ckpt` is of iteration `least`: it is killed in the middle of the run, often
    in the middle of its next checkpoint; every process it started goes with it (torchrun's ranks, each
    in a session of its own). `new_session`: the process and what it starts (Ray's) in a process group
    of their own, killed together. `launcher`: what runs `args` after the Python interpreter (torchrun's
    `-m torch.distributed.run ... -m cherrytop.cli`)."""
    proc = subprocess.Popen([sys.executable, *launcher, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)
    started = []
    try:
        _poll_state(ckpt, least, proc)
    except AssertionError:
        raise AssertionError(proc.communicate()[1][-3000:]) from None
    finally:
        if new_session:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            started = _descendants(proc.pid)
            for pid in (proc.pid, *started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.communicate()
    t0 = time.monotonic()
    while not all(map(_gone, started)):  # not ours to wait on: torchrun's children
        assert time.monotonic() - t0 < 30, f"processes {started} outlived SIGKILL"
        time.sleep(0.02)
    assert proc.returncode == -signal.SIGKILL
