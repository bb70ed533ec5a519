"""The human-feedback app (`cherrytop label ...`): trainers write demonstrations, labelers rank K
answers, reviewers accept or reject demonstrations, and chat feedback from `cherrytop serve` lands in
the same database; `cherrytop label export` writes the JSONL that `cherrytop sft` and `cherrytop rm` read.

- store.py     the database (SQLAlchemy 2 + Alembic migrations in migrations/), every write one transaction
- auth.py      passwords (scrypt), sessions, CSRF tokens, login rate limiting
- stats.py     per-labeler statistics: pairwise agreement [IG §5.1], Krippendorff's α, gold scores
- export.py    database -> demonstrations / comparisons / chat-feedback JSONL (records.py formats)
- generate.py  sample K candidate answers from a checkpoint into the queue, with provenance
- app.py       the FastAPI web app (server-rendered Jinja pages in templates/, a little JS in static/)
- commands.py  `cherrytop label {serve,create-user,disable-user,enable-user,reset-password,revoke-sessions,
               import-prompts,generate,export,stats}`
"""
