"""The store's side of chat ratings: every field bounded, only known sampling settings, a served
answer's repeated rating stored once, and migration 0005 (the served_id column) up and down."""

import pytest

from cherrytop.feedback.store import ChatFeedback, open_store

Q = [{"role": "user", "content": "add 2 and 3 ."}]
OK = dict(messages=Q, response="5 .", rating="down", model="runs/r1/ppo", settings={"temperature": 0.7})


@pytest.mark.parametrize("bad,message", [
    (dict(comment="c" * (ChatFeedback.MAX_COMMENT + 1)), "comment has 2001 characters; at most 2000"),
    (dict(response="r" * (ChatFeedback.MAX_TEXT + 1)), "response has 1000001 characters"),
    (dict(messages=[{"role": "user", "content": "m" * (ChatFeedback.MAX_TEXT + 1)}]), "messages have 1000001 characters"),
    (dict(served_id="s" * 129), "served_id has 129 characters"),
    (dict(settings={"temperature": '" autofocus onfocus=alert(1) x="'}), "'temperature' is not a known sampling"),
    (dict(settings={"style": "x"}), "'style' is not a known sampling setting"),
    (dict(settings={"stop": ["a"] * 5}), "'stop' is not a known"),
    (dict(settings={"stop": ["a" * 257]}), "'stop' is not a known"),
    (dict(settings={"max_tokens": {"nested": 1}}), "'max_tokens' is not a known"),
    (dict(settings={"n": True}), "'n' is not a known"),
])
def test_fields_are_bounded_and_settings_known(store, bad, message):
    with pytest.raises(ValueError, match=message):
        store.add_chat_feedback(**{**OK, **bad})
    assert store.chat_feedback() == [] and store.items() == []


def test_known_settings_are_kept(store):
    settings = {"temperature": 0, "top_p": 0.9, "max_tokens": 64, "n": 2, "seed": None, "stop": ["\n\n"]}
    store.add_chat_feedback(**{**OK, "settings": settings})
    assert store.chat_feedback()[0].settings == settings


def test_a_served_answers_repeated_rating_is_stored_once(store):
    a = store.add_chat_feedback(served_id="chatcmpl-x:0", **OK)
    assert store.add_chat_feedback(served_id="chatcmpl-x:0", **OK) == a  # a double click
    b = store.add_chat_feedback(served_id="chatcmpl-x:0", **{**OK, "comment": "wrong sum"})  # a comment added
    c = store.add_chat_feedback(served_id="chatcmpl-x:1", **OK)  # another choice of the same completion
    assert len({a, b, c}) == 3
    assert [f.served_id for f in store.chat_feedback()] == ["chatcmpl-x:0", "chatcmpl-x:0", "chatcmpl-x:1"]


def test_migration_0005_adds_and_removes_served_id(db_url):
    from alembic import command
    from sqlalchemy import create_engine, inspect

    from cherrytop.feedback.store import _alembic_config
    open_store(db_url).close()  # at head
    engine = create_engine(db_url)

    def columns():
        return {c["name"] for c in inspect(engine).get_columns("chat_feedback")}
    assert "served_id" in columns()
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0004")
    assert "served_id" not in columns()
    engine.dispose()
    s = open_store(db_url)  # opening migrates to head again
    assert s.add_chat_feedback(served_id="chatcmpl-y:0", **OK) == 1
    s.close()
