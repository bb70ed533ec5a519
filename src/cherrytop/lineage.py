"""What each stage of a run was trained from: `runs/<name>/lineage.json` records, per stage, the
fingerprints of its inputs (earlier stages' checkpoints, data files, and compare's settings), so that
a stage whose inputs changed since (an earlier stage trained again, a data file edited) is not reused
without a word. `prepare` runs before a stage (stop, or with the pipeline train it again; `--fresh`
discards the old output at once), `recorded` after it. `cherrytop <stage>` and the pipeline both use them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from cherrytop.config import Config, to_dict
from cherrytop.stages import sft
from cherrytop.train.checkpoint import ResumeError, recover, discard, load_state
from cherrytop.train.loop import check_same_settings, console

STAGES = ("pretrain", "sft", "compare", "rm", "ppo", "ppo_ptx")

LINEAGE = "lineage.json"
"""runs/<name>/lineage.json: per stage, the fingerprints of the inputs it was (or is being) trained
from (earlier stages' checkpoints, data files) and, for compare, its settings."""


@contextmanager
def recorded(name: str, cfg: Config, fresh: bool):
    """Around a stage's run: once it has written output (finished, interrupted or failed after a
    checkpoint), its inputs are in the lineage if they were not yet (a new run's first stage, whose
    folder did not exist before) or it started fresh."""
    try:
        yield
    finally:
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        try:
            if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone reads checkpoints, writes the lineage
                lineage = read_lineage(run_dir)
                if has_output(name, run_dir) and (fresh or name not in lineage):
                    lineage[name] = _entry(name, cfg)
                    _write_lineage(run_dir, lineage)
        except ResumeError:
            pass  # a damaged checkpoint is reported by the next run


def _entry(name: str, cfg: Config, now: dict | None = None) -> dict:
    """The stage's lineage record: its inputs (`now`, when the caller has them already) and compare's settings."""
    return {"inputs": inputs(name, cfg) if now is None else now,
            **({"settings": compare_settings(cfg)} if name == "compare" else {})}


def _hash_path(p: Path) -> str | None:
    """Content fingerprint of a data file or folder (None if it is not there). A file up to 8 MiB is
    read whole; a larger one by its size, its modification time and 1 MiB from its start, middle and
    end, so that checking a stage's inputs never reads a large dataset through (a folder of 500 shards
    of 60 MiB was 30 GB read at every stage start)."""
    p = Path(p)
    if not p.exists():
        return None
    h = hashlib.sha256()
    chunk = 1 << 20
    for f in sorted(q for q in ([p] if p.is_file() else p.rglob("*")) if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else ''}:{st.st_size}\n".encode())
        with f.open("rb") as fh:
            if st.st_size <= 8 * chunk:
                h.update(fh.read())
                continue
            h.update(f"{st.st_mtime_ns}\n".encode())
            for at in (0, (st.st_size - chunk) // 2, st.st_size - chunk):
                fh.seek(at)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def _output(name: str, run_dir: Path) -> Path:
    return run_dir / "data" / "comparisons.stats.json" if name == "compare" else run_dir / name


def fingerprint(name: str, run_dir: Path) -> str | None:
    """What identifies one training of stage `name` of the run: its step and final metrics (any
    retraining logs other numbers), or for compare its files' contents; None if it has no output."""
    if name == "compare":
        train, held = run_dir / "data" / "comparisons.jsonl", run_dir / "data" / "comparisons_heldout.jsonl"
        stats = run_dir / "data" / "comparisons.stats.json"
        parts = [_hash_path(f) for f in (stats, train, held)]
        return None if parts[0] is None else hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]
    state = load_state(run_dir / name, peek=True)
    if state is None:
        return None
    key = {"step": state.get("step"), "iteration": state.get("iteration"), "metrics": state.get("metrics")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage_ref(ref: str) -> str | None:
    return ref if ref in STAGES else None


def inputs(name: str, cfg: Config) -> dict[str, str | None]:
    """Fingerprints of what stage `name` is trained from: earlier stages of the run (`stage:NAME`) and
    data files (`file:PATH`)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    stages: list[str | None] = []
    files: list[str] = []
    if name == "pretrain":
        files = [cfg.pretrain.data]
    elif name == "sft":
        stages = [_stage_ref(sft.init_ref(cfg))]
        files = [cfg.sft.data or str(run_dir / "data" / "demos.jsonl")]
    elif name == "compare":
        stages = [_stage_ref(cfg.compare.policy)]
    elif name == "rm":
        stages = [_stage_ref(cfg.rm.train.init), None if cfg.rm.train.data else "compare"]
        files = [cfg.rm.train.data]
    else:
        stages = [_stage_ref(cfg.ppo.init), _stage_ref(cfg.ppo.reference), _stage_ref(cfg.ppo.reward_model)]
        files = [cfg.ppo.prompts] + ([cfg.pretrain.data] if name == "ppo_ptx" else [])
    out: dict[str, str | None] = {}
    for st in dict.fromkeys(x for x in stages if x):
        out[f"stage:{st}"] = fingerprint(st, run_dir)
    for f in files:
        if f and (Path(f).exists() or not f.startswith(str(run_dir))):
            out[f"file:{f}"] = _hash_path(Path(f))
    return out


def compare_settings(cfg: Config) -> dict:
    d = to_dict(cfg)
    return json.loads(json.dumps({"compare": d["compare"], "world": d["world"], "run.seed": cfg.run.seed}))


def read_lineage(run_dir: Path) -> dict:
    f = run_dir / LINEAGE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        return {}  # a file cut short by a kill: rebuilt from here on


def _write_lineage(run_dir: Path, lineage: dict) -> None:
    if os.environ.get("RANK", "0") != "0" or not run_dir.is_dir():
        return  # a command that stops before it writes anything leaves no run folder behind
    tmp = run_dir / f".{LINEAGE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(lineage, indent=2))
    os.replace(tmp, run_dir / LINEAGE)


def has_output(name: str, run_dir: Path) -> bool:
    out = _output(name, run_dir)
    return out.is_file() if name == "compare" else out.is_dir() and any(out.iterdir())


def stale_reason(name: str, cfg: Config, lineage: dict | None = None, now: dict | None = None) -> str | None:
    """Why the output of stage `name` no longer matches its inputs (an earlier stage trained again, a
    data file changed, compare's settings changed), or None."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    entry = (read_lineage(run_dir) if lineage is None else lineage).get(name)
    if entry is None or not has_output(name, run_dir):
        return None
    now = inputs(name, cfg) if now is None else now
    changed = [k for k in now if k in entry.get("inputs", {}) and entry["inputs"][k] != now[k]]
    reasons = [f"{k[6:]} was trained again since" if k.startswith("stage:") else f"{k[5:]} changed since"
               for k in changed]
    if name == "compare" and "settings" in entry:
        old, new = entry["settings"], compare_settings(cfg)
        diffs = [f"{sec}.{k}: {old[sec].get(k)!r} -> {v!r}" for sec in ("compare", "world") for k, v in new[sec].items()
                 if old.get(sec, {}).get(k) != v]
        diffs += [f"run.seed: {old.get('run.seed')!r} -> {new['run.seed']!r}"] if old.get("run.seed") != new["run.seed"] else []
        if diffs:
            reasons.append("it was made with other settings (" + "; ".join(diffs) + ")")
    if not reasons:
        return None
    what = "its comparisons" if name == "compare" else "its checkpoint"
    return f"{what} no longer match{'' if name == 'compare' else 'es'} its inputs: " + ", ".join(reasons)


def check_own_settings(name: str, state: dict, cfg: Config) -> None:
    """The stage's checkpoint was made with `cfg`'s settings (the reward model's effective max_steps and
    seq_len, which rm.epochs and the model's window set, as saved)."""
    if name == "rm":
        saved = state["config"].get("rm", {}).get("train", {})
        if cfg.rm.epochs > 0 and "max_steps" in saved:
            cfg = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, train=dataclasses.replace(
                cfg.rm.train, max_steps=saved["max_steps"])))
        if saved.get("seq_len", cfg.rm.train.seq_len) < cfg.rm.train.seq_len:
            cfg = dataclasses.replace(cfg, rm=dataclasses.replace(cfg.rm, train=dataclasses.replace(
                cfg.rm.train, seq_len=saved["seq_len"])))
    check_same_settings(state["config"], cfg, name)


def unfinished(up: str, run_dir: Path) -> str | None:
    """Why the earlier stage `up` is not finished (a checkpoint saved half-way), or None."""
    if up == "compare":
        return None
    state = load_state(run_dir / up, peek=True)  # a missing or damaged file stops here, named
    if state is None:
        return None
    saved = state.get("config", {})
    if "iteration" in state:
        p = saved.get("ppo", {})
        total = p.get("episodes", 0) // max(1, p.get("batch_size", 1))
        done = state["iteration"]
    else:
        section = saved.get("rm", {}).get("train", {}) if up == "rm" else saved.get(up, {})
        total, done = section.get("max_steps", 0), state["step"]
    return f"its checkpoint is at step {done} of {total}" if done < total else None


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _portable(e: Exception) -> Exception:
    """`e` as it can travel to the other ranks (pickled): itself, or the same message in the nearest
    class of the ones the command reports in one line."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001  (an exception class whose arguments do not pickle back)
        cls = next((c for c in (ResumeError, FileNotFoundError, ValueError) if isinstance(e, c)), RuntimeError)
        return cls(str(e))


def prepare(name: str, cfg: Config, fresh: bool, redo_stale: bool = False) -> bool:
    """`_prepare` (below); under torchrun (WORLD_SIZE > 1) it joins the process group and rank 0 alone
    runs it while the other ranks wait for its outcome: they then go on with the same `fresh`, or raise
    the same error. So no rank reads a checkpoint rank 0 is discarding or recovering (`recover` renames
    and removes folders), every rank stops on a stale or half-trained input, never one alone (the others
    would wait for it in a collective), and the lineage is written once, before any rank trains."""
    if _world() == 1:
        return _prepare(name, cfg, fresh, redo_stale)
    from cherrytop.train import distributed
    d = distributed.setup(cfg.dist)
    err: Exception | None = None
    outcome: list = [None]
    if d.main:
        try:
            outcome[0] = ("fresh", _prepare(name, cfg, fresh, redo_stale))
        except Exception as e:  # noqa: BLE001  (every rank raises it)
            err, outcome[0] = e, ("error", _portable(e))
    import torch.distributed as tdist
    tdist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise err if err is not None else value
    return value


def _prepare(name: str, cfg: Config, fresh: bool, redo_stale: bool = False) -> bool:
    """Before stage `name` runs: stop (one line) where an earlier stage it needs is only half trained or
    has a damaged file; where its own output no longer matches its inputs (`stale_reason`), train it
    again (`redo_stale`, the pipeline) or stop saying so; on a fresh start discard its old output at
    once (a run killed before its first checkpoint then never resumes the old one), the run's trained
    tokenizer with pretraining's and the world's demonstrations with SFT's; record the stage's inputs.
    Returns whether the stage starts fresh."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if name != "compare":  # a save cut short between its two renames: the checkpoint is back, and checked
        recover(run_dir / name)
    lineage = read_lineage(run_dir)
    now = inputs(name, cfg)
    for key in now:
        if key.startswith("stage:") and (why := unfinished(key[6:], run_dir)):
            raise ResumeError(f"{name} needs a finished {key[6:]} stage, but {why} ({run_dir / key[6:]}); "
                              f"run `cherrytop {key[6:]}` (or the pipeline) to finish it first")
    if not fresh:
        if name != "compare" and (run_dir / name).is_dir():
            state = load_state(run_dir / name, peek=True)  # a damaged checkpoint stops here, its file named
            if state is not None:
                check_own_settings(name, state, cfg)
        if why := stale_reason(name, cfg, lineage, now):
            if not redo_stale:
                raise ResumeError(f"{name}: {why}; pass --fresh to run stage '{name}' again from them")
            console.print(f"[yellow]{name}[/]: {why}; running it again")
            fresh = True
    if fresh:
        if name == "compare":
            for f in ("comparisons.stats.json", "comparisons.jsonl", "comparisons_heldout.jsonl"):
                (run_dir / "data" / f).unlink(missing_ok=True)
        else:
            discard(run_dir / name)
        if name == "pretrain" and not (cfg.tokenizer.path or cfg.model.path):
            shutil.rmtree(run_dir / "tokenizer", ignore_errors=True)
        if name == "sft" and not cfg.sft.data:
            (run_dir / "data" / "demos.jsonl").unlink(missing_ok=True)
    if fresh or name not in lineage or not has_output(name, run_dir):
        lineage[name] = _entry(name, cfg, None if fresh else now)  # fresh: read again, its own data files are gone
        _write_lineage(run_dir, lineage)
    return fresh
