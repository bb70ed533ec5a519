"""The real entry points: the whole pipeline on the `test` preset, every command, and one-line
errors for bad input (file and line, what was expected) with nothing half-written."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cherrytop.cli import main
from cherrytop.model.heads import loglik_term


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["pipeline", "--preset", "test", f"--run.out_dir={out}"]) == 0
    return out / "test"


def test_pipeline_writes_every_stage_and_the_report(run_dir):
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx"):
        assert (run_dir / stage / "config.json").is_file(), stage
        assert (run_dir / stage / "cherrytop.toml").is_file()
    AutoModelForCausalLM.from_pretrained(run_dir / "ppo")  # plain transformers loads every checkpoint
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm")
    coef, ref, excess = loglik_term(rm.config)  # rm.ref_loglik = excess (default): a fitted c, π_ref = the SFT model
    assert coef != 0 and Path(ref) == (run_dir / "sft").resolve() and excess
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["eval"]) == {"pretrain", "sft", "ppo", "ppo_ptx"}
    for e in report["eval"].values():
        assert 0 <= e["truthful"] <= 1 and 0 <= e["harmless"] <= 1 and e["n"] == 22
    assert 0 <= report["versus_sft"]["ppo"]["win_rate"] <= 1
    assert report["pretrain_loss"]["pretrain"] < report["pretrain"]["uniform_loss"]
    assert {"pretrain", "sft", "compare", "rm", "ppo", "ppo_ptx", "eval", "total"} <= set(report["wall_time_s"])
    assert (run_dir / "ppo_curves.png").stat().st_size > 1000
    comps = [json.loads(line) for line in (run_dir / "data" / "comparisons.jsonl").read_text().splitlines()]
    assert all(len(c["responses"]) == 4 and sorted(c["ranking"]) == [0, 1, 2, 3] for c in comps)
    # compare.edits = 1 in the test preset: the last answer is an edit of the most frequent sample
    assert sum(c.get("edits", [{}])[0].get("index") == 3 for c in comps) >= 0.9 * len(comps)
    held = [json.loads(line) for line in (run_dir / "data" / "comparisons_heldout.jsonl").read_text().splitlines()]
    assert report["rm"]["pairs_labelers"] + report["rm"]["pairs_labelers_edits"] == sum(  # every strict pair, once
        4 * 3 // 2 - len(c["ties"]) for c in held)
    logs = [json.loads(line) for line in (run_dir / "logs" / "ppo.jsonl").read_text().splitlines()]
    assert logs[-1]["objective/ref_loglik"] != 0  # PPO adds the reward model's log π_ref term
    for key in ("objective/score", "objective/kl", "objective/beta", "objective/entropy", "rollout/length",
                "policy/clipfrac", "policy/approx_kl", "loss/value", "value/explained_variance"):
        assert key in logs[-1], key
    # a second run skips every finished stage and reproduces the same numbers
    assert main(["pipeline", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--until", "sft"]) == 0



def test_pipeline_aligned_with_dpo_trains_no_reward_model_and_reports_dpo_against_sft(run_dir, tmp_path, capsys):
    """`--pipeline.align=dpo`: pretrain → SFT → compare → DPO → evaluation (a copy of the finished run:
    its pretrain, SFT and comparisons are reused); DPO is scored against SFT as PPO is."""
    import shutil
    run = tmp_path / "test"
    for part in ("pretrain", "sft", "data", "lineage.json"):
        (shutil.copytree if (run_dir / part).is_dir() else shutil.copy)(run_dir / part, run / part)
    assert main(["pipeline", "--preset", "test", f"--run.out_dir={tmp_path}", "--pipeline.align=dpo"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert set(report["eval"]) == {"pretrain", "sft", "dpo"} and not (run / "rm").exists() and not (run / "ppo").exists()
    v = report["versus_sft"]["dpo"]
    assert 0 <= v["win_rate"] <= 1 and math.isfinite(v["kl_to_sft"]) and "judge" not in v  # no reward model to judge
    dpo_w, sft_w = AutoModelForCausalLM.from_pretrained(run / "dpo"), AutoModelForCausalLM.from_pretrained(run / "sft")
    assert any(not torch.equal(a, b) for a, b in zip(dpo_w.parameters(), sft_w.parameters()))  # DPO trained
    assert "── rm ──" not in capsys.readouterr().err  # the other alignment's stages are not announced
    assert report["dpo"]["eval/reward_accuracy"] >= 0 and {"pretrain", "sft", "compare", "dpo", "eval"} <= set(report["wall_time_s"])
    assert "dpo vs SFT" in (run / "report.md").read_text()


def test_arena_rates_every_version_against_the_others(run_dir, tmp_path, capsys):
    out = tmp_path / "arena"
    assert main(["arena", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--checkpoints", "sft", "ppo", "pretrain",
                 "--bootstrap", "50", "--out", str(out)]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["battles"] == 3 * 22  # every pair of models on every held-out task
    rated = {r["model"]: r for r in board["ratings"]}
    assert set(rated) == {"sft", "ppo", "pretrain"} and rated["sft"]["elo"] == 1000.0  # the first is the anchor
    assert all(r["low"] <= r["elo"] <= r["high"] for r in rated.values())
    assert (out / "leaderboard.png").stat().st_size > 1000 and "| 1 |" in (out / "leaderboard.md").read_text()
    assert main(["arena", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--checkpoints", "sft"]) == 2
    assert "at least 2 models" in capsys.readouterr().err


def test_arena_with_people_waits_for_their_votes_and_rates_from_them(run_dir, tmp_path):
    """`--raters people`: the battles go into the labelling app's arena page and the command waits; two people
    who always prefer the pretrained model's answer make it the best rated."""
    import threading
    import uuid

    from cherrytop.feedback.auth import create_user
    from cherrytop.feedback.store import open_store
    url, out = f"sqlite:///{tmp_path / 'fb.db'}", tmp_path / "arena"
    store = open_store(url)
    people = [create_user(store, name, "correct-Horse-7") for name in ("ann", "bob")]
    rc = []
    command = threading.Thread(target=lambda: rc.append(main([
        "arena", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--checkpoints", "sft", "pretrain", "--raters",
        "people", "--db", url, "--tasks", "4", "--votes", "2", "--bootstrap", "30", "--out", str(out),
        "--loop.wait_poll_s=0.05"])))
    command.start()
    votes, deadline = 0, time.time() + 120
    while command.is_alive() and time.time() < deadline:
        for who in people:
            b = store.next_battle(who)
            if b is not None:
                pick = "a" if b.model_a == "pretrain" else "b"
                store.submit_vote(who, b.id, pick if b.answer_a != b.answer_b else "tie", uuid.uuid4().hex, 1.0)
                votes += 1
        time.sleep(0.01)
    command.join(5)
    assert rc == [0] and votes == 4 * 2  # one pair of models on 4 tasks, two votes each
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["battles"] == 8 and board["ratings"][0]["model"] in ("pretrain", "sft")
    same = sum(b.answer_a == b.answer_b for b in [store.battle(i) for i in range(1, 5)])
    if same < 4:  # some answers differ: the preferred model leads
        assert board["ratings"][0]["model"] == "pretrain" and board["ratings"][0]["elo"] > 1000


def test_a_reward_model_continues_from_another_keeping_its_reference(run_dir, tmp_path):
    """`--rm.train.init` naming a reward model (`cherrytop loop --loop.rm=continue`): its head and trunk are the
    start, and its log π_ref term keeps the SFT model as π_ref (it is not a causal LM to take one from)."""
    import shutil
    run = tmp_path / "test"
    for part in ("pretrain", "sft", "data", "lineage.json"):
        (shutil.copytree if (run_dir / part).is_dir() else shutil.copy)(run_dir / part, run / part)
    assert main(["rm", "--preset", "test", f"--run.out_dir={tmp_path}", f"--rm.train.init={run_dir / 'rm'}"]) == 0
    new, old = (AutoModelForSequenceClassification.from_pretrained(d) for d in (run / "rm", run_dir / "rm"))
    coef, ref, _ = loglik_term(new.config)
    assert coef != 0 and Path(ref) == (run_dir / "sft").resolve()
    assert not torch.equal(new.score.weight, old.score.weight)  # trained on from the old head
    fresh = torch.nn.functional.cosine_similarity(new.score.weight.flatten(), old.score.weight.flatten(), dim=0)
    assert fresh > 0.5  # ... which it started from (a new head is a random draw, nearly orthogonal)


def test_until_keeps_the_later_stages_that_are_still_up_to_date(run_dir, tmp_path, capsys):
    """`pipeline --until sft` on a finished run reports every stage that is still finished and up to date
    (it used to drop rm, PPO and their evaluation from report.json); once SFT is trained again, the
    stages built on it are out of date: left out of the report with the reason, and a stage command on
    them stops saying so instead of reusing them silently."""
    import shutil
    assert main(["pipeline", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--until", "sft"]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["eval"]) == {"pretrain", "sft", "ppo", "ppo_ptx"}
    assert {"compare", "rm", "ppo", "ppo_ptx"} <= set(report) and report["not_run"] == {}
    assert "ppo" in report["versus_sft"] and "sft" in report["mean_reward"]
    copy = tmp_path / "runs" / "test"
    shutil.copytree(run_dir, copy)
    out = f"--run.out_dir={copy.parent}"
    assert main(["sft", "--preset", "test", out, "--fresh", "--sft.lr=0.003"]) == 0
    capsys.readouterr()
    assert main(["compare", "--preset", "test", out, "--sft.lr=0.003"]) == 2
    assert "compare: its comparisons no longer match its inputs: sft was trained again since" in capsys.readouterr().err
    assert main(["pipeline", "--preset", "test", out, "--sft.lr=0.003", "--until", "sft"]) == 0
    report = json.loads((copy / "report.json").read_text())
    assert set(report["eval"]) == {"pretrain", "sft"} and not report.get("mean_reward")  # no judge: the rm is stale
    assert set(report["not_run"]) == {"compare", "rm", "ppo", "ppo_ptx"}
    assert "sft was trained again" in report["not_run"]["compare"]
    assert "Not in this report" in (copy / "report.md").read_text()


def test_ppo_with_other_settings_does_not_reuse_its_checkpoint(run_dir, capsys):
    out = f"--run.out_dir={run_dir.parent}"
    assert main(["ppo", "--preset", "test", out, "--ppo.lr=0.5"]) == 2
    assert "ppo.lr: 5e-05 -> 0.5" in capsys.readouterr().err
    assert main(["ppo", "--preset", "test", out]) == 0  # the same settings: already trained, skipped

def test_sample_is_another_name_for_compare(run_dir, tmp_path):
    # issue 3 names the stage `cherrytop sample`: it samples and ranks into the same files as `compare`
    out = tmp_path / "runs" / "test"
    out.mkdir(parents=True)
    for part in ("sft", "tokenizer"):
        (out / part).symlink_to(run_dir / part)
    assert main(["sample", "--preset", "test", f"--run.out_dir={out.parent}"]) == 0
    def read(run):  # the records without the policy's path, which names the run folder
        return [{k: v for k, v in json.loads(line).items() if k != "policy"}
                for line in (run / "data" / "comparisons.jsonl").read_text().splitlines()]
    assert read(out) == read(run_dir)


def test_generate_eval_and_world_commands(run_dir, tmp_path, capsys):
    out_dir = f"--run.out_dir={run_dir.parent}"
    assert main(["generate", "--preset", "test", out_dir, "--checkpoint", "sft", "--prompt", "add 12 and 3 .",
                 "--sample.temperature=0"]) == 0
    assert "> add 12 and 3 ." in capsys.readouterr().out
    assert main(["eval", "--preset", "test", out_dir, "--checkpoint", str(run_dir / "sft"), "--out", str(tmp_path / "e.json")]) == 0
    rates = json.loads((tmp_path / "e.json").read_text())
    assert set(rates) >= {"helpful", "truthful", "harmless", "by_kind"}
    assert main(["world", "demos", "--preset", "test", "-n", "5", "--out", str(tmp_path / "d.jsonl")]) == 0
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 5


def test_chat_is_multi_turn(run_dir, monkeypatch, capsys):
    lines = iter(["what is 12 plus 3 ?", "and 13 plus 4 ?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["chat", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--checkpoint", "sft"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_chat_outgrowing_the_context_window_goes_on(run_dir, monkeypatch, capsys):
    """A chat longer than the model's context window leaves its oldest turns out instead of ending the
    session with an error; one message too long to fit at all is refused and the chat goes on."""
    lines = iter(["what is 12 plus 3 ? " * 3] * 12 + ["hill " * 400, "what is 12 plus 3 ?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["chat", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--checkpoint", "sft",
                 "--sample.max_new_tokens=16"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 13 and "no longer fit the model's context window of" in out
    assert "error: this message is" in out and "say it in fewer words" in out


BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n{"messages": [}\n',
     r"demos.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "x"}]}\n',
     r"demos.jsonl:1: .*unknown role 'assitant'.*did you mean 'assistant'"),
    ('{"msgs": []}\n', r"demos.jsonl:1: missing field 'messages'"),
    ("\n\n", r"demos.jsonl: file is empty"),
]


@pytest.mark.parametrize("content,match", BAD)
def test_bad_demonstrations_give_one_line_errors(run_dir, tmp_path, capsys, content, match):
    f = tmp_path / "demos.jsonl"
    f.write_text(content)
    code = main(["sft", "--preset", "test", f"--run.out_dir={tmp_path}", f"--sft.data={f}",
                 f"--sft.init={run_dir / 'pretrain'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    import re
    assert re.search(match, err), err
    assert not (tmp_path / "test" / "sft").exists()  # nothing half-written


def test_missing_model_and_config_typo(tmp_path, capsys):
    assert main(["eval", "--preset", "test", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope: no such checkpoint" in capsys.readouterr().err
    assert main(["sft", "--preset", "test", "--sft.lerning_rate=1"]) == 2
    assert "unknown key 'lerning_rate'" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "test", f"--run.out_dir={tmp_path}", "--model.path", str(tmp_path / "none")]) == 2
    assert "none: no such model folder" in capsys.readouterr().err
    empty = tmp_path / "empty"  # (not the runs folder: the running stage's run folder holds its lock file)
    empty.mkdir()
    assert main(["pretrain", "--preset", "test", f"--run.out_dir={tmp_path}", f"--pretrain.data={empty}"]) == 2
    assert f"{empty}: folder holds no data files; expected a folder saved by datasets" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no run folder left behind
    runs = tmp_path / "runs"  # a stage name: the error says which run was looked in and what it holds
    assert main(["chat", "--preset", "test", f"--run.out_dir={runs}", "--checkpoint", "sft"]) == 2
    assert f"stage name of run 'test' ({runs / 'test'} has no checkpoints: another --run.name" in capsys.readouterr().err
    (runs / "test" / "sft").mkdir(parents=True)
    (runs / "test" / "sft" / "config.json").write_text("{}")
    assert main(["chat", "--preset", "test", f"--run.out_dir={runs}", "--checkpoint", "stf"]) == 2
    assert "no such checkpoint; expected a model folder or a stage name of run 'test' (sft)" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["eval", "--checkpoint", "ppo", "--basline", "sft"], "unknown option '--basline' for `cherrytop eval` (did you mean --baseline?)"),
    (["serve", "--checkpoint", "ppo", "--feedback_db=x"], "for `cherrytop serve` (did you mean --feedback-db?)"),
    (["sample", "--fesh"], "(did you mean --fresh?)"),
    (["label", "stats", "--dbb", "x.db"], "unknown option '--dbb' for `cherrytop label stats` (did you mean --db?)"),
    (["config", "--checkpoint", "ppo"], "for `cherrytop config` (its options are --preset, --config)"),
])
def test_a_mistyped_option_of_the_command_names_the_option(capsys, args, message):
    """A typo in one of the command's own options is named as such (not as a malformed setting)."""
    assert main([*args, "--run.name=never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_ppo_weight_average_is_the_saved_policy_and_resumes(run_dir):
    """ppo.ema: the checkpoint's policy is the weight average, the live weights go to trainer_state.pt,
    and a second call resumes from them (the average is not the live policy)."""
    import torch

    from cherrytop.config import load_config
    from cherrytop.stages import ppo
    from cherrytop.train.checkpoint import load_state
    base = [f"--run.out_dir={run_dir.parent}", "--ppo.ema=0.5", "--ppo.batch_size=16", "--ppo.minibatch_size=8",
            "--ppo.micro_batch_size=8"]
    ppo.run(load_config("test", [], [*base, "--ppo.episodes=16"]), name="ppo_ema")
    first = load_state(run_dir / "ppo_ema")
    ppo.run(load_config("test", [], [*base, "--ppo.episodes=32"]), name="ppo_ema")
    state = load_state(run_dir / "ppo_ema")
    assert first["iteration"] == 1 and state["iteration"] == 2
    saved = dict(AutoModelForCausalLM.from_pretrained(run_dir / "ppo_ema").named_parameters())
    sft = dict(AutoModelForCausalLM.from_pretrained(run_dir / "sft").named_parameters())
    moved = [n for n in state["live_policy"] if not torch.equal(state["live_policy"][n], sft[n].detach())]
    assert moved  # the live policy trained
    for n in moved:  # the saved policy is the average, neither the SFT weights nor the live ones
        assert not torch.equal(saved[n].detach(), state["live_policy"][n]), n
        assert not torch.equal(saved[n].detach(), sft[n].detach()), n
    assert any(not torch.equal(first["live_policy"][n], state["live_policy"][n]) for n in moved)  # resumed and trained on


def test_ppo_recomputes_activations_with_gradient_checkpointing(run_dir, monkeypatch):
    """--dist.grad_checkpointing=true reaches PPO's policy and value model in full fine-tuning too
    (not only with LoRA adapters)."""
    from cherrytop.config import load_config
    from cherrytop.stages import ppo
    seen, real = [], ppo.update

    def spy(policy, value, *args, **kw):
        seen.append((policy.is_gradient_checkpointing, value.is_gradient_checkpointing))
        return real(policy, value, *args, **kw)
    monkeypatch.setattr(ppo, "update", spy)
    ppo.run(load_config("test", [], [f"--run.out_dir={run_dir.parent}", "--dist.grad_checkpointing=true",
                                     "--ppo.episodes=16", "--ppo.batch_size=16", "--ppo.minibatch_size=8",
                                     "--ppo.micro_batch_size=8"]), name="ppo_gc")
    assert seen == [(True, True)]


def _reference_reward(rm_dir: Path, prompt: list[dict], answer: str) -> float:
    """The reward of one answer with plain transformers, one row, no padding: the head at the
    answer's EOS + the normalising bias + c · Σ_t (log π_ref(y_t) + H_t) over the answer's tokens."""
    import torch
    from cherrytop.data.tokenizer import load_tokenizer, render
    tok = load_tokenizer(rm_dir)
    head = tok(render(tok, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full = tok(render(tok, [*prompt, {"role": "assistant", "content": answer}]), add_special_tokens=False)["input_ids"]
    ids = full[: full.index(tok.eos_token_id, len(head)) + 1]
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    coef, ref_dir, excess = loglik_term(rm.config)
    with torch.no_grad():
        r = float(rm(torch.tensor([ids])).logits[0, 0]) + rm.config.cherrytop_reward_bias
        logp = AutoModelForCausalLM.from_pretrained(ref_dir)(torch.tensor([ids])).logits[0].log_softmax(-1)
    for t in range(len(head), len(ids)):  # token t is predicted at position t - 1
        step = logp[t - 1]
        r += coef * (float(step[ids[t]]) + (float(-(step.exp() * step).sum()) if excess else 0.0))
    return r


def test_judge_scores_match_plain_transformers(run_dir):
    from cherrytop.eval.judge import Judge, judged_win_rate
    prompts = [[{"role": "user", "content": "add 12 and 3 ."}],
               [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what does ann like ?"}],
               [{"role": "user", "content": "hello , i am ann ."}]]
    answers = ["15 .", "ann likes red . i hope this helps , have a nice day .", "you are an idiot"]
    judge = Judge(run_dir / "rm", batch_size=2)  # a padded batch of two, then one
    got = judge.scores(prompts, answers)
    want = [_reference_reward(run_dir / "rm", p, a) for p, a in zip(prompts, answers)]
    assert got == pytest.approx(want, abs=1e-4)
    assert judged_win_rate([1.0, 2.0, 3.0, 0.5], [0.0, 2.5, 1.0, 0.0], ["a", "b", "c", "same"],
                           ["x", "y", "z", "same"]) == {"win_rate": 2.5 / 4, "n": 4, "wins": 2, "ties": 1, "losses": 1}


def test_eval_against_a_baseline_on_your_own_prompts(run_dir, tmp_path, capsys):
    from cherrytop.eval.judge import Judge, judged_win_rate
    out_dir = f"--run.out_dir={run_dir.parent}"
    prompts = tmp_path / "prompts.jsonl"
    assert main(["world", "prompts", "--preset", "test", "-n", "12", "--out", str(prompts)]) == 0
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "e.json"
    assert main(["eval", "--preset", "test", out_dir, "--checkpoint", "sft", "--baseline", "pretrain", "--judge", "rm",
                 "--prompts", str(prompts), "--pairs", str(pairs), "--out", str(out)]) == 0
    assert "win rate against the baseline, judged by the reward model" in capsys.readouterr().out
    r = json.loads(out.read_text())
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == r["n"] == 12 and "helpful" not in r  # your own prompts: no grader
    sft, base = str(run_dir / "sft"), str(run_dir / "pretrain")
    assert {tuple(row["models"]) for row in rows} <= {(sft, base), (base, sft)}
    mine = [row["responses"][row["models"].index(sft)] for row in rows]
    theirs = [row["responses"][row["models"].index(base)] for row in rows]
    judge = Judge(run_dir / "rm")
    a, b = judge.scores([row["messages"] for row in rows], mine), judge.scores([row["messages"] for row in rows], theirs)
    assert r["versus"]["judge"] == judged_win_rate(a, b, mine, theirs)
    assert r["judge"]["mean_reward"] == pytest.approx(sum(a) / 12) and r["judge"]["baseline_mean_reward"] == pytest.approx(sum(b) / 12)
    # the pairs go to labelers as they are: each answer keeps the model that wrote it
    from cherrytop.feedback.store import open_store
    store = open_store(f"sqlite:///{tmp_path / 'feedback.db'}")
    assert store.import_prompts(pairs).added == 12
    assert all([p["model"] for p in i.provenance] == row["models"] for i, row in zip(store.items(), rows))
    store.close()
    # the world's held-out tasks: both models' graded rates and the graders' win rate
    assert main(["eval", "--preset", "test", out_dir, "--checkpoint", "sft", "--baseline", "pretrain", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == r["baseline"]["n"] == 22 and 0 <= r["versus"]["grader"]["win_rate"] <= 1
    assert r["baseline"]["checkpoint"] == base and "by_kind" in r["versus"]["grader"]


@pytest.mark.parametrize("args,message", [
    (["--prompts", "P"], "--prompts has no grader: give --judge"),
    (["--pairs", "x.jsonl"], "--pairs writes two models' answers side by side: give --baseline too"),
    (["--judge", "sft"], "not a reward model"),
])
def test_eval_option_errors(run_dir, tmp_path, capsys, args, message):
    args = [str(tmp_path / "p.jsonl") if a == "P" else a for a in args]
    assert main(["eval", "--preset", "test", f"--run.out_dir={run_dir.parent}", "--checkpoint", "sft", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_a_reward_model_from_another_tool_keeps_its_head_and_a_causal_lm_is_refused(run_dir, tmp_path, capsys):
    import torch
    from cherrytop.model.heads import BIAS_KEY, scalar_model_from
    other = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm")
    for key in [k for k in vars(other.config) if k.startswith("cherrytop_")]:  # no cherrytop keys at all
        delattr(other.config, key)
    other.save_pretrained(tmp_path / "other_rm")
    loaded = scalar_model_from(tmp_path / "other_rm", 0, require_head=True)
    assert torch.equal(loaded.score.weight, other.score.weight) and getattr(loaded.config, BIAS_KEY) == 0.0
    code = main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path}", f"--ppo.init={run_dir / 'sft'}",
                 f"--ppo.reward_model={run_dir / 'sft'}"])
    err = capsys.readouterr().err
    assert code == 2 and "not a reward model: it has no scalar head" in err


def test_ppo_on_ray_names_the_setting_its_reward_model_needs(run_dir, tmp_path, capsys):
    """The default reward model (c · log π_ref) and PPO temperature (0.7) do not go together on Ray yet:
    the error says which setting to pass, before Ray starts."""
    code = main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path}", f"--ppo.init={run_dir / 'sft'}",
                 f"--ppo.reward_model={run_dir / 'rm'}", "--ray.enabled=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "(it is 0.7); pass --ppo.temperature=1" in err and not (tmp_path / "test").exists()


def test_output_piped_into_head_ends_quietly(monkeypatch, capsys):
    class ClosedPipe:  # `cherrytop config | head -1`: the reader has gone after the first line
        lines = 0

        def write(self, text):
            self.lines += text.count("\n")
            if self.lines > 1:
                raise BrokenPipeError(32, "Broken pipe")
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["config", "--preset", "test"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_loop_runs_two_rounds_resumes_after_a_kill_and_continues_when_rounds_are_raised(run_dir, tmp_path):
    """`cherrytop loop` on the test preset (a copy of the finished run: its pretrain, SFT and comparisons are
    the base): killed with SIGKILL in round 1 after its data is in, it resumes at the step it was in (the
    round's data kept as it was), finishes two rounds, and `--rounds 3` later adds a third."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from cherrytop.data.records import read_comparisons
    from cherrytop.feedback.store import open_store
    run = tmp_path / "test"
    for part in ("pretrain", "sft", "data", "lineage.json"):
        (shutil.copytree if (run_dir / part).is_dir() else shutil.copy)(run_dir / part, run / part)
    args = ["loop", "--preset", "test", f"--run.out_dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "cherrytop.cli", *args, "--rounds", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    state = run / "loop.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it once round 1's reward model is training
        if state.is_file() and "collect" in json.loads(state.read_text())["rounds"].get("1", {}).get("steps", {}) \
                and (run / "round-1" / "rm").is_dir():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the loop ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data_before = (run / "round-1" / "data" / "round.jsonl").read_bytes()
    assert set(json.loads(state.read_text())["rounds"]["1"]["steps"]) < {"collect", "rm", "policy", "eval", "arena", "gate"}

    assert main([*args, "--rounds", "2"]) == 0
    loop = json.loads(state.read_text())
    assert [set(loop["rounds"][r]["steps"]) for r in "12"] == [{"collect", "rm", "policy", "eval", "arena", "gate"}] * 2
    assert (run / "round-1" / "data" / "round.jsonl").read_bytes() == data_before  # collected once, not again
    sft = str((run / "sft").resolve())
    r1 = loop["rounds"]["1"]["steps"]
    assert r1["collect"]["served"] == {"version": "sft", "path": str(run / "sft")}
    chat = r1["collect"]["chat"]
    assert chat["served"] == 24 and sum(chat["ratings"].values()) == 24  # loop.chat_prompts of the test preset
    store = open_store(r1["collect"]["feedback_db"])
    rows = store.chat_feedback()  # every rating names the served answer and the checkpoint that wrote it
    assert len(rows) == 24 and all(f.served_id.startswith("chatcmpl-") and Path(f.model).resolve() == Path(sft)
                                   for f in rows)
    rated_down = {f.item_id for f in rows if f.rating != "up"}
    items = store.items()
    assert {i.id for i in items if i.source == "chat"} == rated_down and len(items) == len(rated_down) + 16
    assert items[0].source == "chat" and all(len(i.responses) == 4 for i in items)  # rated ones queued first, K = 4
    ranked = {r.item_id for r in store.rankings()}
    assert ranked == {i.id for i in items}  # every queued item ranked, through the store
    store.close()
    comps = read_comparisons(run / "round-1" / "data" / "round.jsonl")
    assert all(c.meta["round"] == 1 and "task" in c.meta for c in comps)
    base = len(read_comparisons(run / "data" / "comparisons.jsonl"))
    merged = len(read_comparisons(run / "round-2" / "data" / "comparisons.jsonl"))  # retrained on every round so far
    assert merged == base + len(comps) + len(read_comparisons(run / "round-2" / "data" / "round.jsonl"))
    r2 = loop["rounds"]["2"]["steps"]
    assert r2["policy"]["path"] == str(run / "round-2" / "ppo") and (run / "round-2" / "ppo" / "config.json").is_file()
    assert set(r2["arena"]["ratings"]) == {"sft", "round-1", "round-2"} and r2["arena"]["battles"] == 3 * 22
    assert r2["eval"]["rm_accuracy"]["base"]["pairs"] > 0 and 0 <= r2["eval"]["versus_sft"]["win_rate"] <= 1
    assert r2["gate"]["promoted"] in (True, False) and r2["gate"]["verdict"]
    served2 = loop["rounds"]["2"]["served"]["version"]
    assert served2 == ("round-1" if r1["gate"]["promoted"] else "sft")  # the gate decides what round 2 serves
    report = (run / "loop.md").read_text()
    assert "| 1 | sft | 24 |" in report and "| 2 | " + served2 in report and (run / "loop.png").stat().st_size > 1000
    from cherrytop.loop.report import _f
    acc = r2["eval"]["rm_accuracy"]  # round 2's reward model and round 1's on round 2's held-out pairs, both measures
    assert f"| {_f(acc['newest']['grader'])} ({_f(acc['newest_by_round_1_rm']['grader'])}) |" in report

    assert main([*args, "--rounds", "3"]) == 0  # raised later: one more round, the first two untouched
    loop = json.loads(state.read_text())
    assert set(loop["rounds"]["3"]["steps"]) == {"collect", "rm", "policy", "eval", "arena", "gate"}
    assert loop["rounds"]["1"]["steps"] == r1
    assert set(loop["rounds"]["3"]["steps"]["arena"]["ratings"]) == {"sft", "round-1", "round-2", "round-3"}


def test_loop_with_dpo_trains_no_reward_model(run_dir, tmp_path):
    """`cherrytop loop --pipeline.align=dpo`: each round's policy update is DPO from the served policy on every
    round's rankings so far; no reward model is trained, and the round is rated and gated as with PPO."""
    import shutil
    run = tmp_path / "test"
    for part in ("pretrain", "sft", "data", "lineage.json"):
        (shutil.copytree if (run_dir / part).is_dir() else shutil.copy)(run_dir / part, run / part)
    assert main(["loop", "--preset", "test", f"--run.out_dir={tmp_path}", "--rounds", "1", "--pipeline.align=dpo"]) == 0
    steps = json.loads((run / "loop.json").read_text())["rounds"]["1"]["steps"]
    assert steps["policy"]["stage"] == "dpo" and (run / "round-1" / "dpo" / "config.json").is_file()
    assert not (run / "round-1" / "rm").exists() and "rm_accuracy" not in steps["eval"]
    assert set(steps["arena"]["ratings"]) == {"sft", "round-1"} and "gate" in steps


def test_help_of_every_command_prints(capsys):
    """`cherrytop --help` and each command's --help render (a stray % in a help text broke argparse)."""
    from cherrytop.cli import COMMANDS
    for argv in (["--help"], *([c, "--help"] for c in COMMANDS)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
    assert "arena" in capsys.readouterr().out
