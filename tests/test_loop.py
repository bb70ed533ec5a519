"""The loop's second round, through the real commands: `cherrytop label` finds the ratings `cherrytop
serve` stored (same default database), and its export is read by the reward model's and PPO's readers."""

import json

from cherrytop.cli import main
from cherrytop.data.records import read_comparisons, read_prompts
from cherrytop.feedback.store import open_store


def test_label_uses_the_database_serve_stores_ratings_in(tmp_path, monkeypatch, capsys):
    """`cherrytop serve --preset test` stores 👍/👎 in runs/test/feedback.db; `cherrytop label export
    --preset test` without --db reads that database (it used to open an empty ./feedback.db)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHERRYTOP_FEEDBACK_DB", raising=False)
    store = open_store(f"sqlite:///{tmp_path / 'runs' / 'test' / 'feedback.db'}")  # serve's default for the run
    q = [{"role": "user", "content": "what is 12 plus 3 ?"}]
    store.add_chat_feedback(messages=q, response="16 .", rating="down", model="runs/test/ppo", settings={},
                            conversation_id="c1")
    store.add_chat_feedback(messages=q, response="15 .", rating="up", model="runs/test/ppo", settings={},
                            conversation_id="c1")
    store.close()
    assert main(["label", "export", "--preset", "test", "--out", "human"]) == 0
    captured = capsys.readouterr()
    assert "database sqlite:///runs/test/feedback.db" in captured.err and "2 in feedback.jsonl" in captured.out
    assert not (tmp_path / "feedback.db").exists()
    [c] = read_comparisons(tmp_path / "human" / "chat_comparisons.jsonl")  # what `cherrytop rm` reads, once a reviewer opts in
    assert c.responses == ("15 .", "16 .") and c.meta["model"][0]["model"] == "runs/test/ppo"
    [p] = read_prompts(tmp_path / "human" / "prompts.jsonl")  # what `cherrytop ppo --ppo.prompts` reads
    assert [m.to_json() for m in p.messages] == q
    assert json.loads((tmp_path / "human" / "feedback.jsonl").read_text().splitlines()[0])["rating"] == "down"
