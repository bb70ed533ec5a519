"""`cherrytop label <action>`: the feedback app's commands.

  serve            run the web app (uvicorn)
  create-user      add an account (admin or labeler) from the shell
  disable-user     disable an account (its sessions end at once); enable-user undoes it
  reset-password   give an account a new password (its sessions end)
  revoke-sessions  log an account out everywhere
  import-prompts   add prompts (optionally with candidate answers and a gold ranking) to the queue
  generate         sample K answers from a checkpoint for every prompt that has fewer than 2
  export           write demonstrations / comparisons / chat feedback JSONL for `cherrytop sft` and `cherrytop rm`
  stats            per-labeler statistics and agreement, printed

Every action takes `--db URL`; without it, the database `cherrytop serve` stores chat ratings in:
`--serve.feedback_db`, else $CHERRYTOP_FEEDBACK_DB, else sqlite:///runs/<run.name>/feedback.db.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys

ACTIONS = {
    "serve": "run the labeling web app",
    "create-user": "add an account (admin or labeler)",
    "disable-user": "disable an account: it cannot log in and its sessions end at once",
    "enable-user": "enable a disabled account again",
    "reset-password": "give an account a new password (its sessions end)",
    "revoke-sessions": "log an account out everywhere",
    "import-prompts": "add prompts to the labeling queue from a JSONL file",
    "generate": "sample K candidate answers from a checkpoint for prompts that need them",
    "export": "write the JSONL files that `cherrytop sft` and `cherrytop rm` read",
    "stats": "print per-labeler statistics and agreement",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="action")
    for name, help_text in ACTIONS.items():
        s = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        s.set_defaults(command_parser=s)  # for cli's error on an unknown option
        s.add_argument("--db", default=None,
                       help="database URL: sqlite:///FILE or postgresql+psycopg://user@host/db (default: the one "
                            "`cherrytop serve` uses: --serve.feedback_db, else $CHERRYTOP_FEEDBACK_DB, else "
                            "sqlite:///runs/<name>/feedback.db)")
        s.add_argument("--preset", default=argparse.SUPPRESS, help="named preset: tiny (default) or test")
        s.add_argument("--config", action="append", default=argparse.SUPPRESS, metavar="FILE", help="TOML config file(s)")
        s.add_argument("--labels-per-item", type=int, default=2,
                       help="labelers who rank each new item (>= 2 measures agreement; default 2)")
        if name == "serve":
            s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
            s.add_argument("--port", type=int, default=8400, help="port (default 8400)")
            s.add_argument("--secure-cookies", action=argparse.BooleanOptionalAction, default=None,
                           help="mark cookies Secure always (or never with --no-secure-cookies); default: when the "
                                "request came over HTTPS")
            s.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                           help="behind a reverse proxy: the proxy's addresses (comma-separated, or '*'), whose "
                                "X-Forwarded-For / X-Forwarded-Proto give the client's address and https")
        if name == "create-user":
            s.add_argument("name", help="user name")
            s.add_argument("--role", choices=["admin", "labeler"], default="labeler")
            s.add_argument("--password", help="password (default: asked on the terminal, or $CHERRYTOP_PASSWORD)")
        if name in ("disable-user", "enable-user", "revoke-sessions"):
            s.add_argument("name", help="user name")
        if name == "reset-password":
            s.add_argument("name", help="user name")
            s.add_argument("--password", help="new password (default: asked on the terminal, or $CHERRYTOP_PASSWORD)")
        if name == "import-prompts":
            s.add_argument("file", help='JSONL: {"messages": [...]} or {"prompt": "text"}, optional "responses", "gold", "model(s)"')
        if name == "generate":
            s.add_argument("--checkpoint", required=True, help="model folder, or a stage name of the run (e.g. sft)")
            s.add_argument("--k", type=int, default=4, help="answers per prompt (2..9, default 4)")
            s.add_argument("--limit", type=int, default=None, help="at most this many prompts")
        if name == "export":
            s.add_argument("--out", required=True, help="folder for demonstrations.jsonl, comparisons.jsonl, ...")
            s.add_argument("--include-unreviewed", action="store_true",
                           help="also export demonstrations nobody has reviewed yet")


def run(args, cfg) -> None:
    from cherrytop.feedback.store import open_store
    if args.labels_per_item < 1:
        raise ValueError(f"--labels-per-item {args.labels_per_item}: expected at least 1")
    if not args.db:  # the database `cherrytop serve` stores the chat ratings in: the loop's two ends meet
        args.db = default_db(cfg)
        if args.action != "serve":
            print(f"database {args.db}", file=sys.stderr)
    store = open_store(args.db, labels_needed=args.labels_per_item)
    try:
        globals()["_" + args.action.replace("-", "_")](store, args, cfg)
    finally:
        store.close()


def default_db(cfg) -> str:
    """`cherrytop serve`'s feedback database for this config (serve.app.build resolves it the same way)."""
    from pathlib import Path
    return (cfg.serve.feedback_db or os.environ.get("CHERRYTOP_FEEDBACK_DB")
            or f"sqlite:///{Path(cfg.run.out_dir) / cfg.run.name / 'feedback.db'}")


def _serve(store, args, cfg) -> None:
    import socket

    import uvicorn

    from cherrytop.feedback.app import AppConfig, create_app
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # a port in use is one line, not the greeting and then uvicorn's error
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; choose another --port") from None
    print(f"cherrytop feedback on http://{args.host}:{args.port} (database {args.db})")
    app = create_app(store, AppConfig(secure_cookies=args.secure_cookies))
    proxy = {"proxy_headers": True, "forwarded_allow_ips": args.forwarded_allow_ips} if args.forwarded_allow_ips \
        else {"proxy_headers": False}  # without a trusted proxy, no client may claim another address or https
    uvicorn.Server(uvicorn.Config(app, log_level="warning", **proxy)).run(sockets=[sock])


def _create_user(store, args, cfg) -> None:
    from cherrytop.feedback.auth import create_user
    password = args.password or os.environ.get("CHERRYTOP_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
    uid = create_user(store, args.name, password, args.role)
    print(f"created {args.role} {args.name} (id {uid})")


def _disable_user(store, args, cfg) -> None:
    from cherrytop.feedback.auth import find_user
    store.set_disabled(find_user(store, args.name).id, True)
    print(f"disabled {args.name}; their sessions ended")


def _enable_user(store, args, cfg) -> None:
    from cherrytop.feedback.auth import find_user
    store.set_disabled(find_user(store, args.name).id, False)
    print(f"enabled {args.name}")


def _reset_password(store, args, cfg) -> None:
    from cherrytop.feedback.auth import find_user, reset_password
    find_user(store, args.name)  # an unknown name fails before the password is asked
    password = args.password or os.environ.get("CHERRYTOP_PASSWORD") or getpass.getpass(f"new password for {args.name}: ")
    reset_password(store, args.name, password)
    print(f"new password set for {args.name}; their sessions ended")


def _revoke_sessions(store, args, cfg) -> None:
    from cherrytop.feedback.auth import find_user
    n = store.revoke_sessions(find_user(store, args.name).id)
    print(f"ended {n} session{'s' if n != 1 else ''} of {args.name}")


def _import_prompts(store, args, cfg) -> None:
    r = store.import_prompts(args.file)
    print(f"imported {r.added} prompts from {args.file}" + (f"; {r.kept} were already there" if r.kept else "")
          + (f"; {r.extended} already there got their first answers" if r.extended else ""))
    if r.differing:
        more = f" (and {r.differing - 3} more)" if r.differing > 3 else ""
        print(f"warning: {r.differing} prompts were already queued with other answers, which are kept; "
              f"their new answers were not added: {', '.join(r.differing_at)}{more}. Put another model's answers "
              "in the same record as the first's (cherrytop eval --pairs does), or import them into another database.",
              file=sys.stderr)


def _generate(store, args, cfg) -> None:
    from cherrytop.feedback.generate import fill
    from cherrytop.model.load import resolve_checkpoint
    ckpt = resolve_checkpoint(args.checkpoint, cfg)
    s = cfg.sample
    n = fill(store, ckpt, args.k, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
             batch_size=s.batch_size, seed=cfg.run.seed, limit=args.limit)
    print(f"sampled answers for {n} prompts from {ckpt}")


def _export(store, args, cfg) -> None:
    from pathlib import Path

    from cherrytop.feedback.export import FILES, export
    replaced = [f for f in FILES if (Path(args.out) / f).is_file()]
    counts = export(store, args.out, include_unreviewed=args.include_unreviewed)
    print(", ".join(f"{n} in {name}" for name, n in counts.items()) + f" (under {args.out}"
          + ("; the files of an earlier export there were replaced" if replaced else "") + ")")


def _stats(store, args, cfg) -> None:
    from cherrytop.feedback.stats import report
    r = report(store)

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    print(f"{r.items} items, {r.complete} complete; agreement {pct(r.agreement)} over {r.pairs} pairs; alpha " +
          ", ".join(f"{a} {'-' if v is None else f'{v:.3f}'}" for a, v in r.alpha.items()))
    for s in r.labelers:
        med = "-" if s.median_seconds is None else f"{s.median_seconds:.0f}s"
        print(f"  {s.name:<16} {s.role:<8} rankings {s.rankings:<4} demos {s.demonstrations:<4} reviews {s.reviews:<4} "
              f"median {med:<6} agreement {pct(s.agreement):<7} gold {pct(s.gold_score)}")
    for m in r.models:
        print(f"  {m['a']} vs {m['b']}: {m['a']}'s answer preferred {pct(m['win_rate'])} of {m['pairs']} times (ties half)")
