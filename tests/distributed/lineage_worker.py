"""One rank of a 2-process gloo job (started by test_lineage_dist.py with RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set, as torchrun would) that runs `lineage.prepare` for stage sft of the run
in OUT, as `cherrytop sft` under torchrun does before it trains, and prints one JSON line: what
prepare returned or raised, which checkpoint functions this rank called, and whether the stage's
old checkpoint was still there when prepare returned.

argv: OUT fresh(0/1) [slow-aside(0/1): rank 0's `set_aside` takes a second, so a rank that did not
wait for it would still see the old checkpoint]."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cherrytop import lineage
from cherrytop.train import distributed


def make_cfg(out: Path):
    from cherrytop.config import load_config
    return load_config("test", [], [f"--run.out_dir={out}", "--run.name=r", "--dist.strategy=ddp"])


def main() -> None:
    out, fresh, slow = Path(sys.argv[1]), sys.argv[2] == "1", len(sys.argv) > 3 and sys.argv[3] == "1"
    calls: list[str] = []
    for fn in ("load_state", "recover", "set_aside", "lock"):  # every checkpoint read or change prepare makes, logged
        real = getattr(lineage, fn)

        def logged(*a, _fn=fn, _real=real, **k):
            calls.append(_fn)
            if _fn == "set_aside" and slow:
                time.sleep(1.0)
            return _real(*a, **k)
        setattr(lineage, fn, logged)
    cfg = make_cfg(out)
    try:
        result = {"fresh": lineage.prepare("sft", cfg, fresh)}
    except Exception as e:  # noqa: BLE001
        result = {"error": f"{type(e).__name__}: {e}"}
    result |= {"rank": int(os.environ["RANK"]), "calls": sorted(set(calls)),
               "old_checkpoint_there": (out / "r" / "sft").is_dir()}
    lineage.release(out / "r", "sft")  # as `recorded` does after the stage (rank 0 holds the lock)
    print("RESULT " + json.dumps(result), flush=True)
    distributed.teardown("error" not in result)


if __name__ == "__main__":
    main()
