"""`cherrytop loop --rounds N`: the recipe as a loop [Llama 2 §3.2; Anthropic HH §4.5]. After the base stages
(pretrain, SFT, compare: round 0, whose policy is the SFT model), round r:

1. collect: deploy the served policy behind `cherrytop serve`'s app; users chat and rate; the rated-down and
   reported prompts, then fresh ones, are queued; the served policy samples K answers each; labelers rank
   them through the feedback store (`loop/collect.py`);
2. rm: a reward model on every round's comparisons so far (`loop.rm`: retrained, or continued from the last);
3. policy: the RL stage (`rl.algorithm`; or DPO with `pipeline.align=dpo`) from the served policy, the KL
   reference kept at `loop.reference` (the SFT model);
4. eval: the held-out rates, win rate and KL against SFT; the reward model's accuracy on this round's held-out
   pairs (the newest policy's answers) apart from the base ones, and round 1's reward model on the same pairs;
5. arena: every version so far (SFT, each round's policy) in pairwise battles on the held-out tasks, judged by
   a simulated rater; Bradley–Terry ratings with bootstrap 95 % intervals (`eval/arena.py`);
6. gate: the round's policy is served from now on only when its rating beats the served one's (intervals
   apart, or by `loop.gate_margin` Elo points); else the next round starts again from the served one, with
   more data.

Everything of round r lives in runs/<name>/round-<r>/ (a run folder of its own: data/, feedback.db, rm/, ppo/,
lineage.json, arena/); runs/<name>/loop.json records each finished step, so a loop killed anywhere resumes at
the step it was in (a training stage from its last checkpoint, a collection from its start), and a larger
--rounds continues a finished loop. The report across rounds: runs/<name>/loop.md and loop.png.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import replace
from pathlib import Path

from cherrytop.config import Config, to_dict
from cherrytop.data.records import read_comparisons, write_jsonl, write_text_atomically
from cherrytop.train.loop import console

STEPS = ("collect", "rm", "policy", "eval", "arena", "gate")
"""A round's steps, in order; loop.json records each one finished."""

BASE = ("pretrain", "sft", "compare")
"""The stages before the first round (its served policy is the SFT model, its first data compare's)."""


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def round_dir(cfg: Config, r: int) -> Path:
    return run_dir(cfg) / f"round-{r}"


def round_db(cfg: Config, r: int) -> str:
    """The round's feedback database: its chat ratings, ranking queue, rankings and arena votes."""
    return f"sqlite:///{round_dir(cfg, r) / 'feedback.db'}"


def policy_stage(cfg: Config) -> str:
    return "dpo" if cfg.pipeline.align == "dpo" else "ppo"


def read_state(cfg: Config) -> dict:
    path = run_dir(cfg) / "loop.json"
    return json.loads(path.read_text()) if path.is_file() else {"rounds": {}}


def save_state(cfg: Config, state: dict) -> None:
    write_text_atomically(run_dir(cfg) / "loop.json", json.dumps(state, indent=2))


def served_now(cfg: Config, state: dict) -> dict:
    """The policy served now: the last promoted round's, else the SFT model."""
    from cherrytop.model.load import resolve_checkpoint
    for r in sorted(state["rounds"], key=int, reverse=True):
        gate = state["rounds"][r]["steps"].get("gate")
        if gate and gate["promoted"]:
            return {"version": f"round-{r}", "path": state["rounds"][r]["steps"]["policy"]["path"]}
    return {"version": "sft", "path": str(resolve_checkpoint("sft", cfg))}


def round_config(cfg: Config, r: int, served: dict) -> Config:
    """The config a round's stages run with: its own run folder under the loop's, inputs named as folders."""
    from cherrytop.model.load import resolve_checkpoint
    base = run_dir(cfg)
    rm_init = str(resolve_checkpoint(cfg.rm.train.init, cfg))
    if cfg.loop.rm == "continue" and r > 1:
        rm_init = str(round_dir(cfg, r - 1) / "rm")
    reference = served["path"] if cfg.loop.reference == "served" else str(resolve_checkpoint(cfg.loop.reference, cfg))
    demos = cfg.sft.data or str(base / "data" / "demos.jsonl")  # the reward model's demonstration bias reads them
    return replace(
        cfg, run=replace(cfg.run, out_dir=str(base), name=f"round-{r}"), sft=replace(cfg.sft, data=demos),
        rm=replace(cfg.rm, train=replace(cfg.rm.train, init=rm_init, data="")),
        ppo=replace(cfg.ppo, init=served["path"], reference=reference, reward_model="rm",
                    episodes=cfg.loop.episodes or cfg.ppo.episodes),
        dpo=replace(cfg.dpo, train=replace(cfg.dpo.train, init=served["path"], data=""), reference=reference))


def base_stages(cfg: Config) -> None:
    """Pretrain, SFT and compare as the pipeline runs them (a finished one skipped, a stale one redone)."""
    from cherrytop.pipeline import _run_stage
    for name in BASE:
        console.rule(f"[bold]{name}")
        _run_stage(name, cfg, False)


# ---------------------------------------------------------------------------------------------------- steps

def tasks_of_round(cfg: Config, r: int):
    """(chat tasks, fresh tasks) of round r: training-split prompts after the world's n_prompts (which compare
    and PPO use), a new slice each round, so users and labelers never see a held-out prompt or an old one."""
    from cherrytop.world import World
    lc = cfg.loop
    per = lc.chat_prompts + lc.fresh_prompts
    start = cfg.world.n_prompts + (r - 1) * per
    tasks = World(cfg.world).tasks("train", start + per, "prompt")[start:]
    return tasks[: lc.chat_prompts], tasks[lc.chat_prompts:]


def step_collect(cfg: Config, rcfg: Config, r: int, served: dict) -> dict:
    from cherrytop.feedback.store import open_store
    from cherrytop.loop import collect
    from cherrytop.world import Ranking, pairwise_agreement
    rd = round_dir(cfg, r)
    url = round_db(cfg, r)
    store = open_store(url, labels_needed=1)
    chat_tasks, fresh = tasks_of_round(cfg, r)
    seed = cfg.run.seed * 1000 + r
    t0 = time.perf_counter()
    console.print(f"round {r}: serving {served['version']} ({served['path']}); {len(chat_tasks)} simulated chats")
    chat = collect.chat(rcfg, store, url, Path(served["path"]), served["version"], chat_tasks, seed)
    n_held = round(len(fresh) * cfg.loop.heldout_share)
    collect.queue(store, fresh, n_held, cfg.compare.labelers)
    k = cfg.loop.k or cfg.compare.k
    filled = collect.sample(store, rcfg, Path(served["path"]), k, seed)
    tasks = {collect.key_of(t): t for t in chat_tasks + fresh}
    if cfg.loop.labelers == "human":
        collect.wait_for_people(store, url, cfg.loop.wait_poll_s)
    else:
        collect.rank_simulated(store, rcfg, tasks, seed)
    rankings = len(store.rankings())  # (a resumed round's earlier ones included)
    train, held = collect.comparisons(store, tasks, {collect.key_of(t) for t in fresh[:n_held]}, r)
    agree = comparable = 0
    by_item: dict[int, list] = {}
    for c in held:
        by_item.setdefault(c.meta["item"], []).append(Ranking(list(c.ranking), [tuple(t) for t in c.ties], {}, c.labeler or ""))
    for rs in by_item.values():
        for a, b in itertools.combinations(rs, 2):
            x, y = pairwise_agreement(a, b)
            agree, comparable = agree + x, comparable + y
    data = rd / "data"
    write_jsonl(data / "round.jsonl", train)
    write_jsonl(data / "round_heldout.jsonl", held)
    merge_data(cfg, r)
    stats = {"served": served, "chat": {"served": chat.served, "ratings": chat.ratings, "blocked": chat.blocked,
                                        "users": chat.users},
             "queued_rated": sum(1 for i in store.items() if i.source == "chat"), "queued_fresh": len(fresh),
             "items_filled": filled, "rankings": rankings, "train_comparisons": len(train),
             "heldout_comparisons": len(held), "labeler_agreement": agree / comparable if comparable else None,
             "agreement_pairs": comparable, "k": k, "seconds": time.perf_counter() - t0, "feedback_db": url}
    store.close()
    write_text_atomically(data / "comparisons.stats.json", json.dumps(stats, indent=2))
    ups = chat.ratings
    console.print(f"round {r}: {chat.served} answers rated {ups['up']} up / {ups['down']} down / {ups['report']} "
                  f"reported; {rankings} rankings of K={k} ({len(train)} train, {len(held)} held out)")
    return stats


def merge_data(cfg: Config, r: int) -> None:
    """The round's reward-model data, as compare writes a run's: `loop.rm=retrain` every round's comparisons so
    far and the base ones; `continue` this round's alone (round 1: and the base ones). Held-out: all of them."""
    base, rd = run_dir(cfg) / "data", round_dir(cfg, r) / "data"
    rounds = [round_dir(cfg, i) / "data" for i in range(1, r + 1)]
    everything = cfg.loop.rm == "retrain" or r == 1
    train = [base / "comparisons.jsonl", *(d / "round.jsonl" for d in rounds)] if everything else [rd / "round.jsonl"]
    held = [base / "comparisons_heldout.jsonl", *(d / "round_heldout.jsonl" for d in rounds)]
    for out, parts in ((rd / "comparisons.jsonl", train), (rd / "comparisons_heldout.jsonl", held)):
        write_text_atomically(out, "".join(p.read_text(encoding="utf-8") for p in parts))


def step_train(name: str, rcfg: Config) -> dict:
    from cherrytop.pipeline import _run_stage
    console.rule(f"[bold]{rcfg.run.name}: {name}")
    metrics = _run_stage(name, rcfg, False)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def heldout_answers(cfg: Config, version: str, path: Path) -> tuple[list, list[str]]:
    """The held-out tasks (max of eval.n_tasks and loop.arena_tasks: evaluation takes the first eval.n_tasks) and a
    version's greedy answers, kept in runs/<name>/loop_answers/<version>.json."""
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.eval.heldout import answer_heldout
    from cherrytop.model.load import load_model
    from cherrytop.world import World
    world, e = World(cfg.world), cfg.eval
    n = max(e.n_tasks, cfg.loop.arena_tasks)
    cache = run_dir(cfg) / "loop_answers" / f"{version}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["path"] == str(path) and saved["n_tasks"] == n:
            return world.tasks("heldout", n, "eval"), saved["answers"]
    tasks, answers = answer_heldout(load_model(path), load_tokenizer(path), world, n, e.max_new_tokens,
                                    e.batch_size, progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(cache, json.dumps({"path": str(path), "n_tasks": n, "answers": answers}))
    return tasks, answers


def pair_accuracy(judge, comps) -> dict:
    """A reward model's pairwise accuracy on comparisons: against the labelers (pairs they did not tie) and the
    noise-free grader (pairs of different quality, where the record names its task)."""
    from cherrytop.world import Task, grade
    prompts = [[{"role": m.role, "content": m.content} for m in c.prompt] for c in comps for _ in c.responses]
    scores = iter(judge.scores(prompts, [a for c in comps for a in c.responses]))
    lab, true = [0, 0], [0, 0]
    for c in comps:
        s = [next(scores) for _ in c.responses]
        pos = {a: n for n, a in enumerate(c.ranking)}
        tied = {tuple(sorted(t)) for t in c.ties}
        q = [grade(Task.from_record(c.meta["task"]), a).quality for a in c.responses] if "task" in c.meta else None
        for x, y in itertools.permutations(range(c.k), 2):
            if pos[x] < pos[y] and (min(x, y), max(x, y)) not in tied:
                lab[0] += s[x] > s[y]
                lab[1] += 1
            if q is not None and q[x] > q[y]:
                true[0] += s[x] > s[y]
                true[1] += 1
    share = lambda c: c[0] / c[1] if c[1] else None  # noqa: E731
    return {"labelers": share(lab), "grader": share(true), "pairs": lab[1], "grader_pairs": true[1]}


def step_eval(cfg: Config, r: int, policy: Path) -> dict:
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.eval.heldout import score
    from cherrytop.eval.judge import Judge
    from cherrytop.eval.versus import kl_to_reference, win_rate
    from cherrytop.model.load import load_model, resolve_checkpoint
    sft = resolve_checkpoint("sft", cfg)
    n = cfg.eval.n_tasks
    tasks, mine = (x[:n] for x in heldout_answers(cfg, f"round-{r}", policy))
    base = heldout_answers(cfg, "sft", sft)[1][:n]
    rates = score(tasks, mine)
    out = {"rates": {k: v for k, v in rates.items() if k not in ("samples",)},
           "versus_sft": win_rate(tasks, mine, base)}
    out["kl_to_sft"] = kl_to_reference(load_model(policy), load_model(sft), load_tokenizer(sft),
                                       [list(t.messages) for t in tasks], cfg.ppo.max_new_tokens, cfg.ppo.temperature,
                                       cfg.eval.batch_size, cfg.run.seed)
    rm = round_dir(cfg, r) / "rm"
    if (rm / "config.json").is_file():
        new = read_comparisons(round_dir(cfg, r) / "data" / "round_heldout.jsonl")
        old = read_comparisons(run_dir(cfg) / "data" / "comparisons_heldout.jsonl")
        judge = Judge(rm, cfg.eval.batch_size)
        out["rm_accuracy"] = {"newest": pair_accuracy(judge, new) if new else None, "base": pair_accuracy(judge, old)}
        first = round_dir(cfg, 1) / "rm"
        if r > 1 and new and (first / "config.json").is_file():  # round 1's reward model on the same newest pairs
            out["rm_accuracy"]["newest_by_round_1_rm"] = pair_accuracy(Judge(first, cfg.eval.batch_size), new)
    console.print(f"round {r}: win rate vs SFT {out['versus_sft']['win_rate']:.3f}, KL to SFT {out['kl_to_sft']:.2f}; "
                  + " / ".join(f"{a} {rates[a]:.3f}" for a in ("helpful", "truthful", "harmless") if rates[a] is not None))
    return out


def step_arena(cfg: Config, state: dict, r: int) -> dict:
    """Every version so far against every other on the held-out tasks; ratings with 95 % intervals."""
    from cherrytop.eval import arena
    from cherrytop.model.load import resolve_checkpoint
    from cherrytop.world import SimulatedLabeler
    versions = {"sft": resolve_checkpoint("sft", cfg)}
    for i in range(1, r + 1):
        versions[f"round-{i}"] = Path(state["rounds"][str(i)]["steps"]["policy"]["path"])
    tasks, answers = None, {}
    for v, path in versions.items():
        tasks, answers[v] = heldout_answers(cfg, v, path)
    seed = cfg.run.seed * 1000 + r
    if cfg.loop.labelers == "human":  # people vote in the round's labelling app, names hidden
        from cherrytop.feedback.store import open_store
        store = open_store(round_db(cfg, r))
        console.print(f"round {r}: arena battles in the arena page of `cherrytop label serve --db {round_db(cfg, r)}`")
        battles = arena.voted_battles(store, arena.battle_rows(tasks, answers, seed), f"loop-round-{r}", 1,
                                      cfg.loop.wait_poll_s)
        store.close()
    else:
        rater = SimulatedLabeler(cfg.world, "arena", seed=cfg.run.seed)
        battles = arena.judged_battles(tasks, answers, rater.rank, seed)
    rated = arena.ratings(battles, "sft", cfg.loop.arena_bootstrap, cfg.run.seed)
    console.print(arena.write_leaderboard(rated, len(battles), round_dir(cfg, r) / "arena"))
    return {"battles": len(battles), "ratings": {x.model: vars(x) for x in rated}}


def step_gate(cfg: Config, r: int, served: dict, arena_out: dict) -> dict:
    from cherrytop.eval.arena import Rating
    new = Rating(**arena_out["ratings"][f"round-{r}"])
    old = Rating(**arena_out["ratings"][served["version"]])
    m = cfg.loop.gate_margin
    promoted = new.elo - old.elo >= m if m > 0 else new.beats(old)
    rule = f"at least {m:g} Elo points above" if m > 0 else "its 95 % interval wholly above"
    verdict = (f"round {r}'s policy ({new.elo:.0f}, {new.low:.0f} – {new.high:.0f}) is served from now on: "
               f"{rule} {served['version']}'s ({old.elo:.0f}, {old.low:.0f} – {old.high:.0f})") if promoted else (
        f"round {r}'s policy ({new.elo:.0f}, {new.low:.0f} – {new.high:.0f}) is not promoted: not {rule} "
        f"{served['version']}'s ({old.elo:.0f}, {old.low:.0f} – {old.high:.0f}); {served['version']} stays served "
        "and the next round collects more data from it")
    console.print(("[green]" if promoted else "[yellow]") + verdict)
    return {"promoted": promoted, "against": served["version"], "verdict": verdict}


# ---------------------------------------------------------------------------------------------------- driver

FREE = {"loop": ("rounds", "labelers", "wait_poll_s"), "run": ("threads", "keep_freed_memory")}
"""Settings a resumed loop may change (how many rounds, who ranks from now on, process settings)."""


def check_settings(saved: dict, cfg: Config) -> None:
    """A loop resumes only with the settings it was started with (but FREE): its rounds' prompts, data and
    models follow from them."""
    now, saved = json.loads(json.dumps(to_dict(cfg))), json.loads(json.dumps(saved))  # as loop.json holds them
    diffs = [f"{sec}.{k}: {saved[sec].get(k)!r} -> {v!r}" for sec in ("run", "world", "compare", "loop", "rm", "ppo",
                                                                      "rl", "dpo", "pipeline", "eval")
             for k, v in now[sec].items() if k not in FREE.get(sec, ()) and saved.get(sec, {}).get(k) != v]
    if diffs:
        raise ValueError(f"{run_dir(cfg) / 'loop.json'}: this loop was started with other settings ("
                         + "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
                         + "); give them as before, or start a loop under another --run.name")

def run(cfg: Config) -> dict:
    """The base stages, then rounds 1..loop.rounds, each step once (loop.json), then the report."""
    rounds = cfg.loop.rounds
    if cfg.loop.labelers == "simulated" and cfg.compare.prompts:
        raise ValueError("loop.labelers=simulated ranks the built-in world's tasks only; with your own prompts "
                         "set --loop.labelers=human")
    t_start = time.perf_counter()
    base_stages(cfg)
    state = read_state(cfg)
    check_settings(state.setdefault("config", to_dict(cfg)), cfg)
    state["wall_time_s"] = state.get("wall_time_s", {})
    for r in range(1, rounds + 1):
        rs = state["rounds"].setdefault(str(r), {"steps": {}})
        if len(rs["steps"]) == len(STEPS):
            continue
        served = rs.setdefault("served", served_now(cfg, {"rounds": {k: v for k, v in state["rounds"].items()
                                                                     if int(k) < r}}))
        save_state(cfg, state)
        rcfg = round_config(cfg, r, served)
        console.rule(f"[bold]round {r} (serving {served['version']})")
        t0 = time.perf_counter()
        for step in STEPS:
            if step in rs["steps"]:
                continue
            if step == "collect":
                result = step_collect(cfg, rcfg, r, served)
            elif step == "rm":
                result = step_train("rm", rcfg) if cfg.pipeline.align != "dpo" else {}
            elif step == "policy":
                name = policy_stage(cfg)
                result = {"stage": name, "path": str(round_dir(cfg, r) / name), **step_train(name, rcfg)}
            elif step == "eval":
                result = step_eval(cfg, r, Path(rs["steps"]["policy"]["path"]))
            elif step == "arena":
                result = step_arena(cfg, state, r)
            else:
                result = step_gate(cfg, r, served, rs["steps"]["arena"])
            rs["steps"][step] = result
            save_state(cfg, state)
        state["wall_time_s"][str(r)] = state["wall_time_s"].get(str(r), 0.0) + time.perf_counter() - t0
        save_state(cfg, state)
    state["rounds_asked"] = rounds
    from cherrytop.loop.report import write_report
    write_report(cfg, state, rounds)
    console.print(f"loop: {rounds} round(s) in {time.perf_counter() - t_start:.0f} s this run; "
                  f"report {run_dir(cfg) / 'loop.md'}")
    return state
