"""Account administration and the rules for names and passwords: weak passwords refused, a name
with a NUL or control character refused before any query (PostgreSQL failed with a 500), an admin
disables a user / resets a password / ends sessions from the page and from `cherrytop label`."""

import pytest
from fastapi.testclient import TestClient

from cherrytop.cli import main
from cherrytop.feedback.app import create_app
from cherrytop.feedback.auth import create_user, login, name_problem, password_problem
from cherrytop.feedback.store import open_store

from .test_app import csrf_of
from .test_app import login as web_login

GOOD = "label-pass-7"


@pytest.mark.parametrize("password, why", [
    ("password", "most common"), ("Password1!", "most common"), ("qwerty123", "most common"),
    ("seven77", "shorter than 8"), ("abcdefghijkl", "one kind"), ("1234567890123", "one kind"),
    ("annann", "shorter"), ("ann2024!", "the user name"), ("ANN.ann.", None), ("s3cret-pass", None), (GOOD, None),
])
def test_weak_passwords_are_refused_with_the_reason(store, password, why):
    problem = password_problem("ann", password)
    assert (problem is None) if why is None else (why in problem)
    if why is not None:
        with pytest.raises(ValueError, match=why):
            create_user(store, "ann", password)


def test_names_are_checked_before_any_query_on_postgresql(pg_url):
    """Over a real PostgreSQL connection: a NUL in a login name was a 500 (psycopg's DataError)."""
    store = open_store(pg_url)
    try:
        create_user(store, "ann", GOOD)
        app = create_app(store)
        c = TestClient(app, follow_redirects=False)
        csrf = csrf_of(c.get("/login").text)
        for bad in ("ann\x00", "\x00", "a\x01b", "ann\nroot", "x" * 65, "ann<b>"):
            r = c.post("/login", data={"name": bad, "password": GOOD, "csrf": csrf})
            assert r.status_code in (400, 413), repr(bad)  # 413: longer than the name field allows
            assert "not valid" in r.text or "at most 64 allowed" in r.text, repr(bad)
            with pytest.raises(ValueError, match="not valid"):
                login(store, bad, GOOD, "127.0.0.1")
            with pytest.raises(ValueError, match="not valid"):
                create_user(store, bad, GOOD)
        assert name_problem("ann") is None and "\\x00" in name_problem("a\x00")  # shown escaped
        assert c.post("/login", data={"name": " ann ", "password": GOOD, "csrf": csrf}).status_code == 303
        create_user(store, "root", GOOD, "admin")
        root = web_login(app, "root", GOOD)
        r = root.post("/admin/users", data={"csrf": csrf_of(root.get("/admin/users").text), "name": "ev\x00e",
                                            "password": GOOD, "role": "labeler"})
        assert r.status_code == 422 and "not valid" in r.text
    finally:
        store.close()


def test_an_admin_disables_resets_and_logs_out_users_from_the_page(store):
    for name, role in (("root", "admin"), ("ann", "labeler")):
        create_user(store, name, GOOD, role)
    app = create_app(store)
    root, ann = web_login(app, "root", GOOD), web_login(app, "ann", GOOD)
    ann_id = store.user_by_name("ann").id

    def act(action, who=root, user_id=ann_id, **extra):
        return who.post(f"/admin/users/{user_id}", data={"csrf": csrf_of(who.get("/").text), "action": action, **extra})
    assert ann.get("/").status_code == 200
    r = act("disable", who=ann)
    assert r.status_code == 403  # labelers cannot
    assert act("disable").headers["location"] == "/admin/users?done=disable"
    assert ann.get("/").status_code == 303  # her session stopped working at once
    assert "disabled" in root.get("/admin/users").text
    c = TestClient(app, follow_redirects=False)
    r = c.post("/login", data={"name": "ann", "password": GOOD, "csrf": csrf_of(c.get("/login").text)})
    assert r.status_code == 401 and "disabled" in r.text
    act("enable")
    ann = web_login(app, "ann", GOOD)
    act("revoke")
    assert ann.get("/").status_code == 303  # logged out everywhere
    ann = web_login(app, "ann", GOOD)
    r = act("password", password="password")
    assert r.status_code == 422 and "most common" in r.text
    assert act("password", password="n3w-label-pass").status_code == 303
    assert ann.get("/").status_code == 303  # a new password ends the old sessions
    with pytest.raises(ValueError, match="wrong user name or password"):
        login(store, "ann", GOOD, "127.0.0.1")
    web_login(app, "ann", "n3w-label-pass")
    root_id = store.user_by_name("root").id
    r = act("disable", user_id=root_id)
    assert r.status_code == 422 and "your own account" in r.text
    assert act("rename").status_code == 422 and act("disable", user_id=999).status_code == 404


def test_account_commands(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    monkeypatch.delenv("CHERRYTOP_PASSWORD", raising=False)
    assert main(["label", "create-user", "ann", "--password", "password", "--db", url]) == 2
    assert "most common passwords" in capsys.readouterr().err
    assert main(["label", "create-user", "ann", "--password", GOOD, "--db", url]) == 0
    store = open_store(url)
    try:
        login(store, "ann", GOOD, "127.0.0.1")
        login(store, "ann", GOOD, "127.0.0.2")
        assert main(["label", "revoke-sessions", "ann", "--db", url]) == 0
        assert "ended 2 sessions of ann" in capsys.readouterr().out
        assert main(["label", "disable-user", "ann", "--db", url]) == 0
        with pytest.raises(ValueError, match="disabled"):
            login(store, "ann", GOOD, "127.0.0.1")
        assert main(["label", "enable-user", "ann", "--db", url]) == 0
        assert main(["label", "reset-password", "ann", "--password", "ann12345", "--db", url]) == 2
        assert "the password is the user name" in capsys.readouterr().err
        assert main(["label", "reset-password", "ann", "--password", "n3w-label-pass", "--db", url]) == 0
        login(store, "ann", "n3w-label-pass", "127.0.0.1")
        assert main(["label", "disable-user", "nobody", "--db", url]) == 2
        assert "there is no user 'nobody'" in capsys.readouterr().err
        assert main(["label", "disable-user", "a\x00b", "--db", url]) == 2
        assert "not valid" in capsys.readouterr().err
    finally:
        store.close()
