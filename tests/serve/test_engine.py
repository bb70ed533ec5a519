"""The batching engine without HTTP: requests that join a running batch at different steps (so
their KV caches are merged with left padding both ways, and rows leave mid-way) decode exactly what
the reference sampler decodes for each prompt alone, for Llama- and GPT-2-style models; a client
that goes away during a non-streamed request frees its slot."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from cherrytop.config import ModelConfig, ServeConfig
from cherrytop.data.tokenizer import encode_prompt
from cherrytop.model.load import build_model
from cherrytop.rollout.sampler import generate
from cherrytop.serve.engine import Delta, Done, Engine, Finish, Job, Params

PROMPTS = ["hello , i am ann .", "what is 12 plus 3 ?",
           "what colour is the cat of bob ? and the cat of dan , and of ann ?", "hi"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_staggered_joins_decode_like_the_reference_sampler(arch, tiny_model):
    _, tok = tiny_model
    model = build_model(ModelConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=128),
                        vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=4).eval()
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    budgets = [20, 9, 14, 6]  # rows leave the batch at different steps
    ref = [generate(model, tok, [c], max_new_tokens=b, temperature=0)[0] for c, b in zip(convs, budgets)]
    engine = Engine(model, tok, max_batch=8, max_queue=8)
    texts, reasons = [""] * 4, [None] * 4
    done = [threading.Event() for _ in range(4)]

    def sink(i):
        def on(ev):
            if isinstance(ev, Delta):
                texts[i] += ev.text
            elif isinstance(ev, Finish):
                reasons[i] = ev.reason
            elif isinstance(ev, Done):
                done[i].set()
        return on

    engine.start()
    try:
        for i, c in enumerate(convs):  # each request joins after the previous one has made two tokens
            before = engine.load()["tokens"]
            engine.submit(Job(encode_prompt(tok, c), Params(max_tokens=budgets[i], temperature=0), sink(i)))
            end = time.monotonic() + 30
            while engine.load()["tokens"] < before + 2 and not done[i].is_set():
                assert time.monotonic() < end
                time.sleep(0.001)
        for d in done:
            assert d.wait(30)
    finally:
        engine.stop()
    assert [t.strip() for t in texts] == ref
    assert engine.stats["max_rows"] >= 3 and all(r in ("stop", "length") for r in reasons)


@pytest.mark.parametrize("model", ["rambling_model", "parrot_model"])
def test_a_client_gone_from_a_plain_request_frees_its_slot(model, serve, request):
    """The connection is watched, not only checked after 0.5 s without a token: with the parrot model,
    which sends text at every step, the old check never ran and the answer held the only slot to its
    8,000th token (the rambling model's text is held back as an unfinished character)."""
    with serve(request.getfixturevalue(model), cfg=ServeConfig(max_batch=1, max_queue=0)) as s:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000, "temperature": 0}
        if model == "parrot_model":
            short = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=60).json()
            assert short["choices"][0]["message"]["content"] == "hello hello hello hello hello"  # text at every step
        done = s.engine.load()["completed"]
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(s.url + "/v1/chat/completions", json=body, timeout=0.5)
        end = time.monotonic() + 20
        while s.engine.load()["cancelled"] < 1:
            assert time.monotonic() < end, s.engine.load()
            time.sleep(0.02)
        stats = s.engine.load()
        assert stats["running"] == 0 and stats["completed"] == done and stats["tokens"] < 8000
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200  # the only slot is free again


def test_a_failed_prefill_fails_its_requests_and_frees_their_slots(tiny_model):
    """A forward pass that raises (on a GPU: out of memory for a large prefill) while no batch is running
    used to lose the newly admitted jobs: no answer ever came and their slots stayed taken."""
    model, tok = tiny_model
    engine = Engine(model, tok, max_batch=2, max_queue=0)
    forward = model.forward
    fails = [1]

    def flaky(*args, **kwargs):
        if fails and kwargs["input_ids"].shape[1] > 1:  # the prefill
            fails.pop()
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    events = [[], []]
    done = [threading.Event(), threading.Event()]

    def sink(i):
        def on(ev):
            events[i].append(ev)
            if isinstance(ev, Done):
                done[i].set()
        return on

    prompt = encode_prompt(tok, [{"role": "user", "content": "hello , i am ann ."}])
    model.forward = flaky
    engine.start()
    try:
        engine.submit(Job(prompt, Params(max_tokens=4, temperature=0), sink(0)))
        assert done[0].wait(30), "the failed request never got an answer"
        assert events[0][-1].error == "generation failed: out of memory"
        assert engine.load()["running"] == 0
        engine.submit(Job(prompt, Params(max_tokens=4, temperature=0), sink(1)))  # the slots are free again
        assert done[1].wait(30) and events[1][-1].error is None
    finally:
        engine.stop()
        del model.forward
