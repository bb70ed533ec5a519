"""`cherrytop label generate`: K sampled answers per prompt that needs them, with model provenance;
a prompt from a down-rated chat answer keeps that answer and gets K-1 more."""

from cherrytop.cli import main
from cherrytop.feedback.store import open_store


def test_generate_fills_the_queue_with_provenance(tmp_path, tiny_model, capsys):
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "name a colour ."}\n{"prompt": "what is 2 plus 2 ?"}\n'
                       '{"prompt": "ranked already", "responses": ["x", "y"]}\n')
    assert main(["label", "import-prompts", "--db", url, str(prompts)]) == 0
    s = open_store(url)
    s.add_chat_feedback(messages=[{"role": "user", "content": "red ?"}], response="blue .", rating="down",
                        model="chat-model", settings={"temperature": 0.5})
    s.close()
    assert main(["label", "generate", "--db", url, "--checkpoint", str(tiny_model), "--k", "3", "--preset", "test",
                 "--sample.max_new_tokens=5"]) == 0
    assert "sampled answers for 3 prompts" in capsys.readouterr().out
    s = open_store(url)
    items = {i.prompt[-1]["content"]: i for i in s.items()}
    for text in ("name a colour .", "what is 2 plus 2 ?"):
        assert len(items[text].responses) == 3
        prov = items[text].provenance
        assert all(p["model"] == str(tiny_model) and p["settings"]["max_new_tokens"] == 5 for p in prov)
        assert len(prov[0]["model_fingerprint"]) == 16 and prov[0]["model_type"] == "llama"
    assert items["ranked already"].responses == ["x", "y"]  # rankable items are never changed
    chat = items["red ?"]
    assert chat.responses[0] == "blue ." and len(chat.responses) == 3
    assert chat.provenance[0]["model"] == "chat-model" and chat.provenance[1]["source"] == "generate"
    s.close()
    assert main(["label", "generate", "--db", url, "--checkpoint", str(tiny_model)]) == 0
    assert "sampled answers for 0 prompts" in capsys.readouterr().out  # nothing left to do
    assert main(["label", "generate", "--db", url, "--checkpoint", str(tiny_model), "--k", "12"]) == 2
    assert "--k 12: expected 2..9" in capsys.readouterr().err
    assert main(["label", "generate", "--db", url, "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_chat_ratings_arriving_while_answers_are_sampled(tmp_path, tiny_model, monkeypatch):
    # generate used to stop at the first item made rankable meanwhile, and to give an item that got one
    # chat answer meanwhile k + 1 responses
    from cherrytop.feedback.generate import fill
    from cherrytop.rollout import sampler
    s = open_store(f"sqlite:///{tmp_path / 'fb.db'}")
    q = {t: [{"role": "user", "content": t}] for t in ("one ?", "two ?", "three ?")}
    for m in q.values():
        s.add_item(m)
    real = sampler.generate

    def generate_while_people_chat(*a, **kw):
        out = real(*a, **kw)
        for text, rating in (("one .", "down"), ("one !", "down"), ("two .", "down")):  # "one ?" rankable, "two ?" one
            s.add_chat_feedback(messages=q[text.split()[0] + " ?"], response=text, rating=rating, model="chat",
                                settings={})
        return out
    monkeypatch.setattr(sampler, "generate", generate_while_people_chat)
    assert fill(s, tiny_model, k=3, max_new_tokens=4) == 2  # "two ?" and "three ?"
    items = {i.prompt[-1]["content"]: i for i in s.items()}
    assert items["one ?"].responses == ["one .", "one !"]  # left as the chat ratings made it
    assert len(items["two ?"].responses) == 3 and items["two ?"].responses[0] == "two ."
    assert len(items["three ?"].responses) == 3
    s.close()
