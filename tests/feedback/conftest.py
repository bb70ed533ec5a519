"""Fixtures: a fresh feedback database on SQLite and on PostgreSQL (its own schema per test,
dropped afterwards, so parallel runs never collide)."""

import secrets

import pytest

from cherrytop.feedback.store import open_store

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _pg_admin():
    import psycopg
    return psycopg.connect(PG.replace("+psycopg", ""), autocommit=True, connect_timeout=5)


@pytest.fixture
def pg_url():
    """A PostgreSQL URL whose search_path is a fresh schema (dropped after the test)."""
    schema = f"ct_fb_{secrets.token_hex(6)}"
    with _pg_admin() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama-style chat model with cherrytop's tokenizer, saved as a Hugging Face folder."""
    from cherrytop.config import ModelConfig
    from cherrytop.data.tokenizer import train_tokenizer
    from cherrytop.model.load import build_model
    texts = ["name a colour .", "red . blue . green .", "what is 2 plus 2 ?", "2 plus 2 is 4 .", "i do not know ."] * 20
    tok = train_tokenizer(texts, 300)
    model = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=128), len(tok),
                        tok.pad_token_id, tok.eos_token_id)
    out = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
