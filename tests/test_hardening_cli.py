"""The command line tried as a careless user would (issue 26, findings 7, 8, 11, 12): `--fresh` keeps the
old checkpoint until the new run's first save replaces it and says only what is true; a tokenizer left by
a failed run is not reused for other data; filesystem errors are one line with nothing lost; string
settings take the text as typed; `world corpus --out x.txt` writes text; Ctrl-C ends a chat quietly; one
stage of a run trains in one process at a time; `serve` takes --host / --port."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cherrytop import lineage
from cherrytop.cli import main
from cherrytop.config import load_config
from cherrytop.data.records import read_documents
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.train import checkpoint, loop
from cherrytop.train.checkpoint import load_state, save_checkpoint

BAD_LINE = ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
            '{"messages": [{"role": "assitant", "content": "x"}]}\n')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """runs/t with finished pretrain and sft stages (test preset)."""
    out = tmp_path_factory.mktemp("runs")
    args = ["--preset", "test", f"--run.out_dir={out}", "--run.name=t"]
    assert main(["pretrain", *args]) == 0 and main(["sft", *args]) == 0
    return out / "t"


@pytest.fixture
def run(trained, tmp_path):
    """A copy of `trained` to change, and the arguments that address it."""
    shutil.copytree(trained, tmp_path / "t")
    return tmp_path / "t", ["--preset", "test", f"--run.out_dir={tmp_path}", "--run.name=t"]


def lineage_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "lineage.json").read_text())


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


# 7. --fresh: the old checkpoint survives until the new one replaces it

def test_fresh_with_a_bad_data_line_keeps_the_finished_checkpoint(run, tmp_path, capsys):
    run_dir, args = run
    before = lineage_of(run_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(BAD_LINE)
    assert main(["sft", *args, "--fresh", f"--sft.data={bad}"]) == 2
    assert "bad.jsonl:2: message 1 has unknown role 'assitant'" in one_error_line(capsys)
    assert load_state(run_dir / "sft")["step"] == 8  # the finished checkpoint is still there
    assert lineage_of(run_dir) == before  # with the record of what it was trained from
    assert not (run_dir / ".previous").exists() and not (run_dir / "sft.lock").exists()
    assert main(["sft", *args]) == 0 and "already trained (8 steps)" in capsys.readouterr().err


def test_fresh_that_diverges_before_its_first_save_says_the_old_checkpoint_stays(run, capsys):
    run_dir, args = run
    old = load_state(run_dir / "sft")["metrics"]
    assert main(["sft", *args, "--fresh", "--sft.lr=1e4", "--sft.save_every=100"]) == 2
    line = one_error_line(capsys)
    assert "non-finite loss" in line and f"no checkpoint of this run was saved; the previous one stays in {run_dir / 'sft'}" in line
    assert load_state(run_dir / "sft")["metrics"] == old


def test_fresh_that_diverges_after_a_save_names_that_checkpoint(run, capsys):
    run_dir, args = run
    assert main(["sft", *args, "--fresh", "--sft.lr=1e4", "--sft.save_every=1"]) == 2
    line = one_error_line(capsys)
    assert f"the last good checkpoint (step 1) is in {run_dir / 'sft'}" in line
    assert load_state(run_dir / "sft")["step"] == 1 and not (run_dir / ".previous").exists()  # replaced at its first save


def test_fresh_killed_before_its_first_save_leaves_the_old_run_as_it_was(run, tmp_path):
    run_dir, args = run
    before = lineage_of(run_dir)
    demos = tmp_path / "demos.jsonl"
    demos.write_text(BAD_LINE.splitlines()[0] * 1 + "\n")
    cfg = load_config("test", [], args[2:])
    other = load_config("test", [], [*args[2:], f"--sft.data={demos}"])
    assert lineage.prepare("sft", other, True) is True  # --fresh on other data sets the old output aside ...
    assert not (run_dir / "sft").exists() and (run_dir / ".previous" / "sft" / "sft" / "config.json").is_file()
    assert f"file:{demos}" in lineage_of(run_dir)["sft"]["inputs"]
    lineage.release(run_dir, "sft")  # ... and is killed (kill -9 releases its lock)
    assert lineage.prepare("sft", cfg, False) is False  # the next start puts it back, with its record
    lineage.release(run_dir, "sft")
    assert load_state(run_dir / "sft")["step"] == 8 and lineage_of(run_dir) == before
    assert not (run_dir / ".previous").exists()


def test_divergence_with_no_checkpoint_at_all_says_none_was_saved(tmp_path):
    from cherrytop.data.collate import pad_batch
    from cherrytop.model.load import build_model
    from cherrytop.train.lm import lm_count, lm_step
    cfg = load_config("test", [], [f"--run.out_dir={tmp_path}", "--run.name=t", "--sft.max_steps=4",
                                   "--sft.save_every=10", "--sft.eval_every=10"])
    rows = [([2, 3, 4, 5, 6], [-100, -100, 4, 5, 6])] * 4

    def nan_loss(model, batch):
        s, c = lm_step(model, batch)
        return s * float("nan"), c
    stage = loop.Stage("sft", build_model(cfg.model, 40, 0, 1, seed=0), None, cfg.sft,
                       lambda step: [pad_batch(rows, 0)], nan_loss, lm_count)
    with pytest.raises(FloatingPointError, match=r"at step 1 .*; no checkpoint was saved$"):
        loop.run(stage, cfg)
    assert not (tmp_path / "t" / "sft").exists()


# 8. the run's trained tokenizer is in the lineage

def test_a_tokenizer_left_by_a_failed_run_is_trained_again_for_other_data(tmp_path, capsys):
    args = ["--preset", "test", f"--run.out_dir={tmp_path}", "--run.name=t"]
    two = tmp_path / "two.txt"
    two.write_text("hello world one two\n\nthree four five\n")
    assert main(["pretrain", *args, f"--pretrain.data={two}"]) == 2  # too small: fails after training the tokenizer
    small = len(load_tokenizer(tmp_path / "t" / "tokenizer"))
    assert small < 700
    capsys.readouterr()
    assert main(["pretrain", *args, "--pretrain.max_steps=2"]) == 0  # the world's corpus
    err = capsys.readouterr().err
    assert "tokenizer" in err and "pretrain.data:" in err and "training it again" in err
    assert len(load_tokenizer(tmp_path / "t" / "tokenizer")) == 700 == len(load_tokenizer(tmp_path / "t" / "pretrain"))
    assert "world" in lineage_of(tmp_path / "t")["tokenizer"]["inputs"]


def test_a_tokenizer_that_matches_its_inputs_is_reused(run, capsys):
    run_dir, args = run
    mtime = (run_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns
    assert main(["pretrain", *args]) == 0
    assert "already trained" in capsys.readouterr().err
    assert (run_dir / "tokenizer" / "tokenizer.json").stat().st_mtime_ns == mtime


# 11. filesystem errors: one line, the path and the cause, nothing lost

def test_a_run_folder_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["pretrain", "--preset", "test", f"--run.out_dir={tmp_path / 'afile' / 'runs'}"]) == 2
    assert one_error_line(capsys) == f"error: {tmp_path / 'afile' / 'runs' / 'test'}: Not a directory"
    assert main(["world", "demos", "--preset", "test", "--out", str(tmp_path / "afile" / "d.jsonl")]) == 2
    assert "a file is there, where a folder is needed" in one_error_line(capsys)


def test_an_immutable_run_folder_is_one_line(run, capsys):
    run_dir, args = run
    if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        assert main(["sft", *args, "--fresh"]) == 2
        assert one_error_line(capsys) == f"error: {run_dir / 'sft.lock'}: Operation not permitted"
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)])
    assert load_state(run_dir / "sft")["step"] == 8


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` (and what is under it) read-only: a read-only bind mount where mounting is allowed (root),
    else mode 555 on it and its subfolders. Yields the cause the system then gives."""
    if os.geteuid() != 0:
        folders = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
        for p in folders:
            p.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            for p in folders:
                p.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip("a read-only bind mount is not available here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("a read-only bind mount is not available here")
        yield "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_runs_folder_is_one_line(run, capsys):
    run_dir, args = run
    old = load_state(run_dir / "sft")["metrics"]
    with read_only(run_dir.parent) as cause:
        assert main(["sft", *args, "--fresh"]) == 2
        assert one_error_line(capsys) == f"error: {run_dir / 'sft.lock'}: {cause}"
        assert main(["pretrain", *args, "--run.name=new"]) == 2  # a new run's folder cannot be made
        assert one_error_line(capsys) == f"error: {run_dir.parent / 'new'}: {cause}"
    assert load_state(run_dir / "sft")["metrics"] == old and lineage_of(run_dir)["sft"]
    assert main(["sft", *args]) == 0 and "already trained (8 steps)" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_the_checkpoint_is_intact(run, monkeypatch, capsys):
    run_dir, args = run
    old = load_state(run_dir / "sft")["metrics"]

    def full(*a, **k):  # what torch says when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 188800 vs 188688")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    assert main(["sft", *args, "--fresh", "--sft.save_every=2"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {run_dir / 'sft'}: No space left on device (writing the checkpoint:")
    assert "unexpected pos 188800 vs 188688" in line
    monkeypatch.undo()
    assert load_state(run_dir / "sft")["metrics"] == old  # the finished checkpoint, back and whole
    assert not list(run_dir.glob(".sft*")) and not (run_dir / ".previous").exists()


def test_an_os_error_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = load_config("test", [], [f"--run.out_dir={tmp_path}"])

    class Weights:
        def save_pretrained(self, out):
            (Path(out) / "config.json").write_text("{}")
    save_checkpoint(tmp_path / "c", Weights(), None, cfg, {"step": 1})

    def enospc(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    monkeypatch.setattr(checkpoint.torch, "save", enospc)
    with pytest.raises(OSError) as e:
        save_checkpoint(tmp_path / "c", Weights(), None, cfg, {"step": 2})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.load(tmp_path / "c" / "trainer_state.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# 12. smaller ones

@pytest.mark.parametrize("name", ["nan", "123", "true", "1e3", "inf"])
def test_a_string_setting_takes_the_text_as_typed(name):
    assert load_config("test", [], [f"--run.name={name}"]).run.name == name
    assert load_config("test", [], ["--run.name", name]).run.name == name
    assert load_config("test", [], ["--sft.lr=1e-3"]).sft.lr == 1e-3  # numbers stay numbers


def test_world_corpus_as_txt_is_text_pretraining_reads_back(tmp_path, capsys):
    out = tmp_path / "c.txt"
    assert main(["world", "corpus", "--preset", "test", "--world.corpus_dialogue_share=0", "--out", str(out)]) == 0
    docs = read_documents(out)
    assert len(docs) > 100 and all(isinstance(d, str) for d in docs)
    assert not out.read_text().lstrip().startswith("{")
    capsys.readouterr()
    assert main(["world", "corpus", "--preset", "test", "--out", str(tmp_path / "d.txt")]) == 2
    assert "conversations, which a .txt file of documents cannot" in one_error_line(capsys)
    assert main(["world", "demos", "--preset", "test", "--out", str(tmp_path / "e.txt")]) == 2
    assert "writes JSONL records; give --out a .jsonl file" in one_error_line(capsys)
    assert not (tmp_path / "d.txt").exists() and not (tmp_path / "e.txt").exists()


@pytest.mark.parametrize("where", ["prompt", "answer"])
def test_ctrl_c_ends_a_chat_quietly(trained, monkeypatch, capsys, where):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    if where == "prompt":
        monkeypatch.setattr("builtins.input", interrupt)
    else:
        monkeypatch.setattr("builtins.input", lambda _: "hello")
        monkeypatch.setattr("cherrytop.rollout.sampler.generate", interrupt)
    assert main(["chat", "--preset", "test", f"--run.out_dir={trained.parent}", "--run.name=t", "--checkpoint", "sft"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and err == ""


def test_a_second_process_on_the_same_stage_stops_naming_the_first(run, capsys):
    run_dir, args = run
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run_dir / 'sft.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["sft", *args, "--fresh"]) == 2
        line = one_error_line(capsys)
        assert f"stage 'sft' of run 't' is being trained by process {holder.pid}" in line
        assert load_state(run_dir / "sft")["step"] == 8  # --fresh did nothing
    finally:
        holder.kill()
        holder.wait()
    assert main(["sft", *args]) == 0  # its holder gone, the stage runs
    assert not (run_dir / "sft.lock").exists()


@pytest.mark.parametrize("extra,host,port", [
    (["--host", "0.0.0.0", "--port", "8123"], "0.0.0.0", 8123),
    (["--serve.port=8124"], "127.0.0.1", 8124),
])
def test_serve_takes_host_and_port_as_label_serve_does(monkeypatch, extra, host, port):
    seen = {}
    monkeypatch.setattr("cherrytop.serve.app.run", lambda ckpt, cfg, db: seen.update(host=cfg.serve.host, port=cfg.serve.port))
    assert main(["serve", "--preset", "test", "--checkpoint", "x", *extra]) == 0
    assert seen == {"host": host, "port": port}


def test_label_serve_listens_on_its_host_and_port(monkeypatch, tmp_path):
    import socket

    import uvicorn
    with socket.socket() as probe:  # a free port on an address other than the default 127.0.0.1
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    seen = {}

    def run(server, sockets):
        seen["addr"] = sockets[0].getsockname()
        sockets[0].close()
    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert main(["label", "serve", "--db", f"sqlite:///{tmp_path / 'fb.db'}", "--host", "127.0.0.2", "--port", str(port)]) == 0
    assert seen["addr"] == ("127.0.0.2", port)
