"""`cherrytop <command>`: parses arguments, loads the config, dispatches. Settings are given as
`--section.key=value` after the command (see `cherrytop config`)."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

from cherrytop.stages import STAGES, runner

COMMANDS = {
    "pipeline": "run every stage in order on the configured data (default: the built-in world)",
    **{s.name: s.help for s in STAGES.values() if s.help},
    "generate": "answer prompts from a checkpoint (batched sampling)",
    "chat": "talk to a checkpoint in the terminal (multi-turn)",
    "eval": "score a checkpoint: helpful / truthful / harmless on held-out tasks, win rate against a baseline, reward-model judge",
    "loop": "rounds of serve, chat ratings, ranking, reward model, policy update, arena rating and promotion",
    "arena": "rate model versions against each other: pairwise battles on held-out tasks, Bradley–Terry ratings with bootstrap 95-percent intervals",
    "world": "write the built-in world's data to files (demos, prompts, corpus, heldout)",
    "config": "list every setting with its value and meaning",
    "plan": "memory plan of a stage on N GPUs: what fits, with which options (LoRA, FSDP, offload, grad-ckpt)",
    "convert": "turn a sharded (FSDP) checkpoint into a plain Hugging Face folder",
    "label": "the human-feedback app: serve, create-user, import-prompts, generate, export, stats",
    "serve": "serve a checkpoint: OpenAI-compatible API, web chat, moderation, feedback (--serve.* settings)",
}

ALIASES = {"compare": ["sample"]}
"""Other names of a command (`cherrytop sample` is `cherrytop compare`)."""

TRAINING = ("pipeline", *(s.name for s in STAGES.values() if s.help))
"""The commands that train (and resume from their last checkpoint)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cherrytop", description="The InstructGPT recipe end to end.", allow_abbrev=False,
                                epilog="Settings: --section.key=value after the command; `cherrytop config` lists them.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_text in COMMANDS.items():
        s = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False, aliases=ALIASES.get(name, []))
        s.set_defaults(command_parser=s)
        s.add_argument("--preset", default="tiny", help="named preset: tiny (default) or test")
        s.add_argument("--config", action="append", default=[], metavar="FILE", help="TOML config file(s)")
        if name in TRAINING:
            s.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
        if name == "pipeline":
            s.add_argument("--until", default=list(STAGES)[-1], choices=list(STAGES), help="last stage to run")
        if name == "serve":
            s.add_argument("--checkpoint", required=True, help="model folder, or a stage name of the run (e.g. ppo)")
            s.add_argument("--host", help="address to listen on (the same as --serve.host)")
            s.add_argument("--port", type=int, help="port (the same as --serve.port)")
            s.add_argument("--feedback-db", help="feedback database URL (default: $CHERRYTOP_FEEDBACK_DB, "
                                                 "else sqlite:///runs/<name>/feedback.db)")
        if name in ("generate", "chat", "eval"):
            s.add_argument("--checkpoint", required=True, help="model folder, or a stage name of the run (e.g. sft)")
        if name == "generate":
            s.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
            s.add_argument("--prompts", help="JSONL file of prompts ({\"messages\": [...]})")
            s.add_argument("--out", help="write answers as JSONL here instead of printing")
        if name == "eval":
            s.add_argument("--out", help="JSON file for the results (default: <checkpoint>/eval.json)")
            s.add_argument("--baseline", help="a second checkpoint answering the same prompts: its rates and the win rate against it")
            s.add_argument("--prompts", help="JSONL prompts of your own instead of the built-in world's held-out tasks "
                                             "(no grader: give --judge and/or --pairs)")
            s.add_argument("--judge", help="a reward model (folder or `rm`) that scores every answer and judges the win rate")
            s.add_argument("--pairs", help="write both models' answers, in random order, for `cherrytop label import-prompts`")
        if name == "loop":
            s.add_argument("--rounds", type=int, help="rounds to have done (the same as --loop.rounds); raise it later to continue")
            s.add_argument("--labelers", choices=["simulated", "human"],
                           help="who ranks and votes: simulated, or people in `cherrytop label serve` (--loop.labelers)")
        if name == "arena":
            s.add_argument("--checkpoints", nargs="+", required=True, help="model folders or stage names of the run (2 or more)")
            s.add_argument("--anchor", help="the model rated 1000 (default: the first)")
            s.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the intervals")
            s.add_argument("--out", help="folder for leaderboard.md / .json / .png (default: runs/<name>/arena)")
            s.add_argument("--raters", choices=["simulated", "people"], default="simulated",
                           help="who judges: the built-in world's simulated rater, or people in the labelling app's "
                                "arena page (`cherrytop label serve`; the command waits for their votes)")
            s.add_argument("--db", help="--raters people: the feedback database (default: the run's, as `cherrytop label`)")
            s.add_argument("--votes", type=int, default=1, help="--raters people: votes per battle, each from another person")
            s.add_argument("--tasks", type=int, help="held-out tasks to battle on (default: eval.n_tasks)")
        if name == "label":
            from cherrytop.feedback.commands import add_arguments
            add_arguments(s)
        if name == "plan":
            s.add_argument("--model", required=True, help="Hugging Face model folder or its config.json (nothing is downloaded)")
            s.add_argument("--stage", default="ppo", choices=["pretrain", "sft", "rm", "ppo"], help="stage to plan")
            s.add_argument("--gpus", type=int, default=8, help="number of GPUs")
            s.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
            s.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward per GPU")
            s.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (PPO: prompt + response)")
            s.add_argument("--rollout-batch", type=int, default=16, help="PPO: sequences generated together per GPU")
            s.add_argument("--lora-r", type=int, default=16, help="LoRA rank when LoRA is an option")
            s.add_argument("--cpu-mem", type=float, default=1024.0, help="GiB of CPU memory per node (for offload)")
            s.add_argument("--frozen-dtype", default="bf16", choices=["bf16", "fp32"],
                           help="PPO: weights of the frozen reference and reward model (--dist.frozen_dtype; auto = bf16 on GPU)")
        if name == "convert":
            s.add_argument("checkpoint", help="checkpoint folder with shards/ (written under --dist.strategy=fsdp)")
            s.add_argument("--out", required=True, help="folder to write the plain Hugging Face model to")
        if name == "world":
            s.add_argument("what", choices=["demos", "prompts", "corpus", "heldout"], help="what to write")
            s.add_argument("--out", required=True, help="JSONL file to write (the corpus also as .txt: documents "
                                                        "separated by blank lines, as --pretrain.data reads it)")
            s.add_argument("-n", type=int, default=None, help="how many records (default: the world config's)")
    return p


def _load(args, extra):
    from transformers.utils import logging as hf_logging

    from cherrytop.config import load_config
    from cherrytop.train import host
    hf_logging.disable_progress_bar()  # our own bars report progress
    hf_logging.set_verbosity_error()  # e.g. "score.weight newly initialised" is expected for a new reward head
    cfg = load_config(args.preset, args.config, extra)
    host.configure(cfg.run)
    return cfg


def _model(args, cfg):
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.model.load import load_model, resolve_checkpoint
    ckpt = resolve_checkpoint(args.checkpoint, cfg)
    return ckpt, load_model(ckpt), load_tokenizer(ckpt)


def cmd_generate(args, cfg) -> None:
    from cherrytop.data.records import read_prompts, write_jsonl
    from cherrytop.rollout.sampler import generate
    _, model, tok = _model(args, cfg)
    prompts = [[{"role": "user", "content": p}] for p in args.prompt]
    if args.prompts:
        prompts += [[{"role": m.role, "content": m.content} for m in p.messages] for p in read_prompts(args.prompts)]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT or --prompts FILE")
    s = cfg.sample
    answers = generate(model, tok, prompts, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                       batch_size=s.batch_size, seed=cfg.run.seed, progress=len(prompts) > s.batch_size)
    if args.out:
        write_jsonl(args.out, [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in zip(prompts, answers)])
        print(f"wrote {len(answers)} answers to {args.out}")
    else:
        for p, a in zip(prompts, answers):
            print(f"> {p[-1]['content']}\n{a}\n")


def cmd_chat(args, cfg) -> None:
    from cherrytop.model.load import context_window
    ckpt, model, tok = _model(args, cfg)
    window = context_window(model.config)
    print(f"chatting with {ckpt} (temperature {cfg.sample.temperature}); /reset starts over, /quit, Ctrl-D or Ctrl-C leaves")
    try:
        _chat_loop(cfg, model, tok, window)
    except KeyboardInterrupt:  # Ctrl-C, at the prompt or while it answers: the chat ends
        print()


def _chat_loop(cfg, model, tok, window: int | None) -> None:
    from cherrytop.rollout.sampler import fit_history, generate
    s = cfg.sample
    history: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        try:  # the oldest turns that no longer fit the context window (with room to answer) are left out
            prompt = fit_history(tok, history, window, s.max_new_tokens)
        except ValueError as e:  # this one message cannot fit: refuse it, the chat goes on
            print(f"error: {e}; say it in fewer words")
            history.pop()
            continue
        if len(prompt) < len(history):
            print(f"(the oldest {len(history) - len(prompt)} messages no longer fit the model's context window of "
                  f"{window} tokens and are left out)")
        answer = generate(model, tok, [prompt], max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                          top_p=s.top_p, seed=cfg.run.seed + turn)[0]
        turn += 1
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}")


def cmd_eval(args, cfg) -> None:
    from cherrytop.eval.evaluate import run, summary
    result = run(cfg, args.checkpoint, args.baseline, args.prompts, args.judge, args.pairs)
    out = Path(args.out) if args.out else Path(result["checkpoint"]) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n".join(summary(result)) + f"\nwritten to {out}")


def cmd_arena(args, cfg) -> None:
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.eval import arena
    from cherrytop.eval.heldout import answer_heldout
    from cherrytop.model.load import load_model, resolve_checkpoint
    from cherrytop.world import SimulatedLabeler, World
    folders = {}
    for c in args.checkpoints:
        path = resolve_checkpoint(c, cfg)
        name = c if not Path(c).exists() else path.name
        if name in folders:
            raise ValueError(f"--checkpoints: two models named {name!r}; give distinct folders or stage names")
        folders[name] = path
    if len(folders) < 2:
        raise ValueError("--checkpoints: expected at least 2 models to rate against each other")
    world, e, answers, tasks = World(cfg.world), cfg.eval, {}, []
    n_tasks = e.n_tasks if args.tasks is None else args.tasks
    if n_tasks < 1 or args.votes < 1:
        raise ValueError(f"--tasks {n_tasks} --votes {args.votes}: expected at least one task and one vote per battle")
    for name, path in folders.items():
        tasks, answers[name] = answer_heldout(load_model(path), load_tokenizer(path), world, n_tasks, e.max_new_tokens,
                                              e.batch_size, progress=True)
    if args.raters == "people":
        from cherrytop.feedback.commands import default_db
        from cherrytop.feedback.store import open_store
        url = args.db or default_db(cfg)
        store = open_store(url)
        import hashlib
        tag = "arena:" + hashlib.sha256("|".join(f"{n}={p}" for n, p in folders.items()).encode()).hexdigest()[:16]
        print(f"{len(folders) * (len(folders) - 1) // 2 * len(tasks)} battles in the arena page of `cherrytop label "
              f"serve --db {url}`; waiting for {args.votes} vote(s) each (Ctrl-C stops; the same command resumes)")
        battles = arena.voted_battles(store, arena.battle_rows(tasks, answers, cfg.run.seed), tag, args.votes,
                                      cfg.loop.wait_poll_s)
        store.close()
    else:
        rater = SimulatedLabeler(cfg.world, "arena", seed=cfg.run.seed)
        battles = arena.judged_battles(tasks, answers, rater.rank, cfg.run.seed)
    rated = arena.ratings(battles, args.anchor or next(iter(folders)), args.bootstrap, cfg.run.seed)
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / cfg.run.name / "arena"
    table = arena.write_leaderboard(rated, len(battles), out)
    print(table + f"{len(battles)} battles on {len(tasks)} held-out tasks; written to {out}")


def cmd_loop(args, cfg) -> None:
    from cherrytop.loop import rounds
    rounds.run(cfg)


def cmd_world(args, cfg) -> None:
    from cherrytop.data.records import write_jsonl, write_text_atomically
    from cherrytop.world import World
    suffix = Path(args.out).suffix.lower()
    if suffix in (".parquet", ".csv", ".tsv", ".json") or suffix == ".txt" and args.what != "corpus":
        raise ValueError(f"{args.out}: `cherrytop world {args.what}` writes JSONL records; give --out a .jsonl file"
                         + (" (or .txt for the corpus)" if args.what == "corpus" else ""))
    world = World(cfg.world)
    if args.what == "corpus" and suffix == ".txt":
        docs = world.corpus("train")[: args.n]
        if chats := sum(not isinstance(d, str) for d in docs):
            raise ValueError(f"{args.out}: the corpus holds {chats} conversations, which a .txt file of documents "
                             "cannot (pretraining renders them with the chat template); give --out a .jsonl file, or "
                             "--world.corpus_dialogue_share=0 for a corpus without them")
        bad = next((i for i, d in enumerate(docs) if any(not ln.strip() for ln in d.strip().split("\n"))), None)
        if bad is not None:
            raise ValueError(f"{args.out}: document {bad} has a blank line, which in a .txt file separates documents; "
                             "give --out a .jsonl file")
        text = "\n\n".join(d.strip() for d in docs) + "\n"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out, text)
        print(f"wrote {len(docs)} documents to {args.out}")
        return
    if args.what == "demos":
        rows = [{"messages": list(m)} for m in world.demonstrations(args.n)]
    elif args.what == "prompts":
        rows = [{"messages": list(t.messages), "task": t.to_record()} for t in world.prompts(args.n)]
    elif args.what == "heldout":
        rows = [{"messages": list(t.messages), "task": t.to_record()} for t in world.tasks("heldout", args.n or cfg.eval.n_tasks)]
    else:
        docs = world.corpus("train")[: args.n]
        rows = [{"text": d} if isinstance(d, str) else {"messages": d} for d in docs]
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} records to {args.out}")


SHORT_OPTIONS = {"serve": ("serve", ("host", "port")), "loop": ("loop", ("rounds", "labelers"))}
"""Options a command takes as `--key V` for its settings' `--section.key=V` (`serve --port`, as `label serve` takes it)."""


def _short_options(args, extra: list[str]) -> list[str]:
    """The command's short options (SHORT_OPTIONS) as the settings they stand for."""
    if args.command not in SHORT_OPTIONS:
        return extra
    section, keys = SHORT_OPTIONS[args.command]
    return extra + [f"--{section}.{k}={v}" for k in keys if (v := getattr(args, k, None)) is not None]


def _os_error(e: OSError) -> str:
    """A filesystem error as one line: the path(s) and the cause (`strerror`)."""
    if e.strerror is None:
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "") if e.filename is not None else ""
    cause = "a file is there, where a folder is needed" if isinstance(e, FileExistsError) and \
        e.filename2 is None and Path(e.filename or "").is_file() else e.strerror
    return f"{where}: {cause}" if where else cause


def cmd_serve(args, cfg) -> None:
    from cherrytop.serve.app import run
    run(args.checkpoint, cfg, args.feedback_db)


def cmd_label(args, cfg) -> None:
    from cherrytop.feedback.commands import run
    run(args, cfg)


def cmd_config(args, cfg) -> None:
    from cherrytop.config import describe
    for key, value, doc in describe(cfg):
        print(f"--{key}={value}\n    {doc}")


def cmd_plan(args, cfg) -> None:
    from cherrytop.plan import Workload, report
    print(report(args.model, args.stage, args.gpus, args.gpu_mem,
                 Workload(args.micro_batch, args.seq_len, args.rollout_batch, args.lora_r), cpu_node_gib=args.cpu_mem,
                 frozen_bytes=2 if args.frozen_dtype == "bf16" else 4, critic=cfg.rl.algorithm == "ppo"))


def cmd_convert(args, cfg) -> None:
    from cherrytop.train.distributed import convert_to_hf
    print(f"wrote {convert_to_hf(Path(args.checkpoint), Path(args.out))}")


def _unknown_option(args, extra: list[str]) -> str | None:
    """The error for the first extra `--name` without a section (a typo of one of the command's own
    options, such as `--basline`), or None: every other extra argument is a `--section.key` setting."""
    name = next((a.split("=", 1)[0] for a in extra if a.startswith("--") and "." not in a.split("=", 1)[0]), None)
    if name is None:
        return None
    sub = args.command_parser  # the innermost (sub)command's parser; argparse lists its options only in _actions
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"did you mean {close[0]}?" if close else f"its options are {', '.join(options)}"
    return f"unknown option '{name}' for `{sub.prog}` ({hint}); settings are --section.key=value (`cherrytop config`)"


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if unknown := _unknown_option(args, extra):
        print(f"error: {unknown}", file=sys.stderr)
        return 2
    args.command = next((name for name, other in ALIASES.items() if args.command in other), args.command)
    extra = _short_options(args, extra)
    from cherrytop.train import distributed
    from cherrytop.train.loop import ResumeError
    clean = False
    try:
        cfg = _load(args, extra)
        stage = STAGES.get(args.command)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (stage is None or not stage.torchrun
                                                           or stage.ray_module and cfg.ray.enabled):
            ok = ", ".join(s.name for s in STAGES.values() if s.torchrun and s.help)
            raise ValueError(f"`cherrytop {args.command}` runs in one process; under torchrun use {ok} (ppo without "
                             "--ray.enabled: Ray places PPO's models itself)")
        if args.command == "pipeline":
            from cherrytop import pipeline
            pipeline.run(cfg, until=args.until, fresh=args.fresh)
        elif stage is not None:
            from cherrytop.lineage import prepare, recorded  # the stage's inputs and checkpoint checked, recorded
            fresh = prepare(args.command, cfg, args.fresh)
            with recorded(args.command, cfg, fresh):  # PPO on Ray actors with --ray.enabled
                runner(args.command, cfg)(cfg, fresh=fresh)
        else:
            globals()[f"cmd_{args.command}"](args, cfg)
        clean = True
    except (ValueError, FileNotFoundError, ResumeError, FloatingPointError) as e:  # config, data, checkpoint errors
        if os.environ.get("CHERRYTOP_DEBUG"):
            raise
        print(f"error: {_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and the next run resumes from it" if args.command in TRAINING
              else "interrupted; `cherrytop loop` again resumes at the step it was in" if args.command == "loop"
              else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`cherrytop config | head`): nothing more to print
        try:  # Python flushes stdout once more at exit: send that to /dev/null, not to the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (io.UnsupportedOperation)
            pass
        return 0
    except OSError as e:  # a read-only or full disk, a folder that is a file: the path and the cause
        if os.environ.get("CHERRYTOP_DEBUG"):
            raise
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(clean)  # under torchrun: leave the process group before the interpreter ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
