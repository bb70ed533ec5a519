"""What each stage of a run was trained from: `runs/<name>/lineage.json` records, per stage, the
fingerprints of its inputs (earlier stages' checkpoints, data files, and compare's settings), so that
a stage whose inputs changed since (an earlier stage trained again, a data file edited) is not reused
without a word; the run's trained tokenizer is recorded the same way (`tokenizer_inputs`). `prepare`
runs before a stage (stop, or with the pipeline train it again; `--fresh` sets the old output aside
until the new run's first checkpoint replaces it), `recorded` after it. `cherrytop <stage>` and the
pipeline both use them; between the two the process holds runs/<name>/<stage>.lock.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from cherrytop.config import Config, to_dict
from cherrytop.stages import STAGES
from cherrytop.train.checkpoint import ENTRY_FILE, ResumeError, discard, load_state, previous_dir, recover
from cherrytop.train.loop import check_same_settings, console

LINEAGE = "lineage.json"
"""runs/<name>/lineage.json: per stage, the fingerprints of the inputs it was (or is being) trained
from (earlier stages' checkpoints, data files) and, for compare, its settings."""


@contextmanager
def recorded(name: str, cfg: Config, fresh: bool):
    """Around a stage's run: once it has written output (finished, interrupted or failed after a
    checkpoint), its inputs are in the lineage if they were not yet (a new run's first stage, whose
    folder did not exist before) or it started fresh; a `--fresh` run that wrote none puts the old
    output back (`settle`). Then the stage's lock is released."""
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        try:
            if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone reads checkpoints, writes the lineage
                if not settle(name, run_dir):
                    lineage = read_lineage(run_dir)
                    old = json.dumps(lineage, sort_keys=True)
                    if has_output(name, run_dir) and (fresh or name not in lineage):
                        lineage[name] = _entry(name, cfg)
                    if name == "pretrain" and trains_tokenizer(cfg) and (run_dir / "tokenizer").is_dir() \
                            and "tokenizer" not in lineage:  # trained by this run (a new run's folder had no lineage)
                        lineage["tokenizer"] = {"inputs": tokenizer_inputs(cfg)}
                    if json.dumps(lineage, sort_keys=True) != old:
                        _write_lineage(run_dir, lineage)
        except ResumeError:
            pass  # a damaged checkpoint is reported by the next run
        except OSError:
            if not failed:  # else the stage's own error is the one to report
                raise
        finally:
            release(run_dir, name)


def _owned(name: str, cfg: Config) -> tuple[list[str], list[str]]:
    """What stage `name` writes under the run folder: (its output, the main file first; what a fresh
    run of it redoes besides: pretraining's trained tokenizer, SFT's world demonstrations)."""
    main = ["data/comparisons.stats.json", "data/comparisons.jsonl", "data/comparisons_heldout.jsonl"] \
        if name == "compare" else [name]
    extra = ["tokenizer"] if name == "pretrain" and trains_tokenizer(cfg) else []
    extra += ["data/demos.jsonl"] if name == "sft" and not cfg.sft.data else []
    return main, extra


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def set_aside(name: str, cfg: Config, lineage: dict) -> None:
    """`--fresh`: move the stage's old output (with the tokenizer or demonstrations it was made from,
    and their lineage records) to runs/<name>/.previous/<stage>. The new run's first checkpoint drops
    it (`write_dir_atomically`); `settle` puts it back where the new run wrote no output (it failed, or
    was killed, before). With no old output, what an earlier run left goes at once."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    main, extra = _owned(name, cfg)
    if not has_output(name, run_dir):
        for rel in main + extra:
            discard(run_dir / rel) if rel == name else _remove(run_dir / rel)
        return
    prev = previous_dir(run_dir / name)
    shutil.rmtree(prev, ignore_errors=True)
    prev.mkdir(parents=True)
    keys = [name] + (["tokenizer"] if "tokenizer" in extra else [])
    moved = [rel for rel in main + extra if (run_dir / rel).exists()]
    tmp = prev / f".{ENTRY_FILE}.tmp"
    tmp.write_text(json.dumps({"lineage": {k: lineage.get(k) for k in keys}, "moved": moved,
                               "main": len([m for m in moved if m in main])}))
    os.replace(tmp, prev / ENTRY_FILE)  # from here on it is what `settle` puts back
    for rel in moved:  # the output first: once it is gone, `settle` knows to put everything back
        (prev / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / rel, prev / rel)


def settle(name: str, run_dir: Path) -> bool:
    """What `set_aside` kept of stage `name`: dropped if the stage has output again (the new run's), else
    put back with its lineage records (the output last, so a kill half-way is settled again). Returns
    whether it put it back."""
    prev = previous_dir(run_dir / name)
    if not prev.is_dir():
        return False
    try:
        kept = json.loads((prev / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        kept = None
    if kept is None or has_output(name, run_dir):
        shutil.rmtree(prev, ignore_errors=True)
        try:
            prev.parent.rmdir()
        except OSError:
            pass
        return False
    moved, n_main = kept["moved"], kept["main"]

    def back(rel: str) -> None:
        if (prev / rel).exists():
            _remove(run_dir / rel)
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(prev / rel, run_dir / rel)
    for rel in moved[n_main:]:
        back(rel)
    lineage = read_lineage(run_dir)
    for k, v in kept["lineage"].items():
        if v is None:
            lineage.pop(k, None)
        else:
            lineage[k] = v
    _write_lineage(run_dir, lineage)
    for rel in reversed(moved[:n_main]):
        back(rel)
    shutil.rmtree(prev, ignore_errors=True)
    try:
        prev.parent.rmdir()  # .previous, if it holds no other stage's
    except OSError:
        pass
    console.print(f"[yellow]{name}[/]: the new run saved no output; the previous one is back in {run_dir / moved[0]}")
    return True


_held: dict[Path, tuple[int, bool]] = {}
"""The stage locks this process holds: lock file -> (its descriptor, whether taking it made the run folder)."""


class Busy(ResumeError):
    """Another process is training the same stage of the run."""


def lock(run_dir: Path, name: str) -> None:
    """Hold runs/<name>/<stage>.lock (flock) until `release`: a second process that would train the same
    stage of the run stops with one line naming the holder's pid. (Under torchrun rank 0 takes it.)"""
    made = not run_dir.is_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}.lock"
    if path in _held:
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise Busy(f"{run_dir / name}: stage '{name}' of run '{run_dir.name}' is being trained by process {holder} "
                       f"(it holds {path}); wait for it to end, or choose another --run.name") from None
        try:  # its holder may have removed it (`release`) between our open and flock: take the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = (fd, made)


def release(run_dir: Path, name: str) -> None:
    """Let go of the stage's lock; a run folder that taking it made and that holds nothing else (the
    stage stopped before it wrote anything) goes with it."""
    path = run_dir / f"{name}.lock"
    fd, made = _held.pop(path, (None, False))
    if fd is None:
        return
    path.unlink(missing_ok=True)  # while still holding it: a waiting process then retries on a new file
    os.close(fd)
    if made:
        try:
            run_dir.rmdir()
        except OSError:
            pass


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


def inputs(name: str, cfg: Config) -> dict[str, str | None]:
    """Fingerprints of what stage `name` is trained from (`STAGES[name].needs`): earlier stages of the
    run (`stage:NAME`) and data files (`file:PATH`)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    refs, files = STAGES[name].needs(cfg)
    out: dict[str, str | None] = {}
    for st in dict.fromkeys(r for r in refs if r in STAGES):  # (a reference that names no stage is a folder)
        out[f"stage:{st}"] = fingerprint(st, run_dir)
    for f in files:
        if f and (Path(f).exists() or not f.startswith(str(run_dir))):
            out[f"file:{f}"] = _hash_path(Path(f))
    return out


def trains_tokenizer(cfg: Config) -> bool:
    """Pretraining trains the run's tokenizer (runs/<name>/tokenizer): none is given."""
    return not (cfg.tokenizer.path or cfg.model.path)


def tokenizer_inputs(cfg: Config) -> dict:
    """What the run's trained tokenizer is trained from: pretraining's data file (its fingerprint) or
    the world's settings, and the tokenizer's settings."""
    data = {f"file:{cfg.pretrain.data}": _hash_path(Path(cfg.pretrain.data))} if cfg.pretrain.data \
        else {"world": to_dict(cfg)["world"]}
    return json.loads(json.dumps({**data, "tokenizer.vocab_size": cfg.tokenizer.vocab_size,
                                  "tokenizer.min_frequency": cfg.tokenizer.min_frequency}))


def _tokenizer_differs(old: dict, new: dict) -> str:
    files = lambda d: [k[5:] for k in d if k.startswith("file:")]  # noqa: E731
    out = []
    if files(old) != files(new):
        out.append(f"pretrain.data: {files(old)[0] if files(old) else 'the world'} -> "
                   f"{files(new)[0] if files(new) else 'the world'}")
    else:
        out += [f"{f} changed since" for f in files(new) if old[f"file:{f}"] != new[f"file:{f}"]]
        out += ["the world's settings changed since"] if old.get("world") != new.get("world") else []
    out += [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if k.startswith("tokenizer.") and old.get(k) != new[k]]
    return "; ".join(out) or "other inputs"


def check_tokenizer(cfg: Config, lineage: dict) -> None:
    """Before pretraining: the run's trained tokenizer is reused only if it was trained from what it
    would be trained from now (`tokenizer_inputs`). One left by a run that stopped before its first
    checkpoint is trained again; one a checkpoint was made with stops the stage (`--fresh` starts over).
    Its record in `lineage` is updated."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    folder, now = run_dir / "tokenizer", tokenizer_inputs(cfg)
    old = lineage.get("tokenizer", {}).get("inputs")
    if folder.exists() and old != now:
        if has_output("pretrain", run_dir):
            if old is not None:  # (no record: an older run's, its checkpoint made with it; kept)
                raise ResumeError(f"pretrain: the run's tokenizer ({folder}) was trained from other inputs than "
                                  f"now ({_tokenizer_differs(old, now)}); pass --fresh to run stage 'pretrain' again")
        else:
            why = _tokenizer_differs(old, now) if old is not None else "no record of its inputs"
            console.print(f"[yellow]pretrain[/]: the run's tokenizer ({folder}) was trained from other inputs ({why}); "
                          "training it again")
            _remove(folder)
    lineage["tokenizer"] = {"inputs": now}


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
    """The stage's checkpoint was made with `cfg`'s settings (the reward model's and DPO's effective
    max_steps and seq_len, which their `epochs` and the model's window set, as saved)."""
    if name in ("rm", "dpo"):
        section = getattr(cfg, name)
        saved, t = state["config"].get(name, {}).get("train", {}), section.train
        if section.epochs > 0 and "max_steps" in saved:
            t = dataclasses.replace(t, max_steps=saved["max_steps"])
        if saved.get("seq_len", t.seq_len) < t.seq_len:
            t = dataclasses.replace(t, seq_len=saved["seq_len"])
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(section, train=t)})
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
        section = saved.get(up, {}).get("train", {}) if up in ("rm", "dpo") else saved.get(up, {})
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
    again (`redo_stale`, the pipeline) or stop saying so; on a fresh start set its old output aside
    (`set_aside`: kept until the new run's first checkpoint replaces it), the run's trained tokenizer
    with pretraining's and the world's demonstrations with SFT's; check pretraining's tokenizer against
    its inputs; record the stage's inputs. The stage's lock is taken first (released by `recorded`, or
    here on an error). Returns whether the stage starts fresh."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    lock(run_dir, name)
    try:
        return _prepare_locked(name, cfg, fresh, redo_stale)
    except BaseException:
        try:
            settle(name, run_dir)
        finally:
            release(run_dir, name)
        raise


def _prepare_locked(name: str, cfg: Config, fresh: bool, redo_stale: bool) -> bool:
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if name != "compare":  # a save cut short between its two renames: the checkpoint is back, and checked
        recover(run_dir / name)
    settle(name, run_dir)  # a --fresh run killed before its first checkpoint: the old output is back
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
        set_aside(name, cfg, lineage)
    old = json.dumps(lineage, sort_keys=True)
    if name == "pretrain" and trains_tokenizer(cfg):
        check_tokenizer(cfg, lineage)
    if fresh or name not in lineage or not has_output(name, run_dir):
        lineage[name] = _entry(name, cfg, None if fresh else now)  # fresh: read again, its own data files are gone
    new_folder = _held.get(run_dir / f"{name}.lock", (None, False))[1]
    if (fresh or json.dumps(lineage, sort_keys=True) != old) and not new_folder:  # (a new run's: once it has output)
        _write_lineage(run_dir, lineage)
    return fresh
