"""The OpenAI-compatible API driven by the official `openai` client: plain, streaming, n > 1, stop
sequences, seeds, dynamic batching (batched answers equal the ones computed alone and the reference
sampler's), every error case with OpenAI's status and error body, 429 over capacity and past one
client's share, a client that disconnects mid-stream freeing its slot; the limits that keep one
request from stalling the server (body size, prompt characters), the security headers, and the
start-up warning of a server open to the network."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cherrytop.config import ServeConfig
from cherrytop.data.tokenizer import encode_prompt
from cherrytop.rollout.sampler import generate

CONTEXT = 256  # the tiny model's window (conftest)
HELLO = [{"role": "user", "content": "hello , i am ann ."}]
PROMPTS = [[{"role": "user", "content": t}] for t in
           ("what is 12 plus 3 ?", "hello , i am bob .", "what colour is the cat of dan ?", "what is 7 plus 21 ?",
            "hello , i am cid .", "what is 25 plus 4 ?")]


@pytest.fixture(scope="module")
def api(tiny_model, serve):
    with serve(tiny_model, cfg=ServeConfig(max_batch=8, max_queue=8)) as s:
        yield s


def ask(c, messages, **kw):
    kw.setdefault("max_tokens", 24)
    return c.chat.completions.create(model="tiny", messages=messages, **kw)


def test_models_and_a_greedy_answer_equal_the_reference_sampler(api, tiny_model, client):
    c = client(api)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    model, tok = tiny_model
    r = ask(c, HELLO, temperature=0)
    ref = generate(model, tok, [HELLO], max_new_tokens=24, temperature=0)[0]
    assert r.choices[0].message.content.strip() == ref and ref
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion" and r.model == "tiny"
    assert r.usage.prompt_tokens == len(encode_prompt(tok, HELLO))
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 24 else "stop")


def test_streaming_sends_role_first_deltas_then_finish_and_done(api, client):
    c = client(api)
    plain = ask(c, HELLO, temperature=0).choices[0]
    chunks = list(ask(c, HELLO, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain.message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == plain.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    # the raw wire format: server-sent events ending with data: [DONE]
    with httpx.stream("POST", api.url + "/v1/chat/completions", json={
            "model": "tiny", "messages": HELLO, "max_tokens": 8, "stream": True}, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    json.loads(events[0][6:])


def test_n_choices_and_seed_reproducibility_whatever_the_batch(api, client):
    c = client(api)
    a = ask(c, HELLO, n=3, temperature=1.0, seed=7)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in a.choices]
    assert len(set(texts)) > 1  # independent samples
    assert [ch.message.content for ch in ask(c, HELLO, n=3, temperature=1.0, seed=7).choices] == texts
    assert [ch.message.content for ch in ask(c, HELLO, n=3, temperature=1.0, seed=8).choices] != texts
    # the same seeded request while other requests share its batch gives the same answers
    with ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(ask, c, p, temperature=1.0, max_tokens=32) for p in PROMPTS[:3]]
        again = pool.submit(ask, c, HELLO, n=3, temperature=1.0, seed=7)
        [f.result() for f in noise]
        assert [ch.message.content for ch in again.result().choices] == texts
    streamed = ["", "", ""]
    for ch in ask(c, HELLO, n=3, temperature=1.0, seed=7, stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts


def test_concurrent_requests_are_batched_and_answer_as_if_alone(api, tiny_model, client):
    c = client(api)
    model, tok = tiny_model
    alone = [ask(c, p, temperature=0, max_tokens=32).choices[0].message.content for p in PROMPTS]
    ref = generate(model, tok, PROMPTS, max_new_tokens=32, temperature=0)
    assert [a.strip() for a in alone] == ref
    api.engine.stats["max_rows"] = 0
    start = threading.Barrier(len(PROMPTS))

    def together(p):
        start.wait()
        return ask(c, p, temperature=0, max_tokens=32).choices[0].message.content

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(together, PROMPTS))
    assert batched == alone
    assert api.engine.stats["max_rows"] >= 2  # several requests shared one forward pass


def test_stop_sequences_cut_the_answer(api, client):
    c = client(api)
    full = ask(c, HELLO, temperature=0).choices[0].message.content
    stop = full.strip()[3:6]
    assert len(stop) == 3
    expected = full[: full.find(stop)]
    r = ask(c, HELLO, temperature=0, stop=[stop, "never occurs"]).choices[0]
    assert (r.message.content, r.finish_reason) == (expected, "stop")
    streamed = "".join(ch.choices[0].delta.content or "" for ch in ask(c, HELLO, temperature=0, stop=stop, stream=True))
    assert streamed == expected


def test_prompt_longer_than_the_context_window_is_a_400(api, client):
    c = client(api)
    with pytest.raises(openai.BadRequestError) as e:
        ask(c, [{"role": "user", "content": "hello " * CONTEXT}])
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert f"maximum context length is {CONTEXT} tokens" in e.value.message


def test_unknown_model_is_a_404(api, client):
    with pytest.raises(openai.NotFoundError) as e:
        client(api).chat.completions.create(model="gpt-9", messages=HELLO)
    assert e.value.code == "model_not_found" and e.value.param == "model" and "gpt-9" in e.value.message


@pytest.mark.parametrize("bad,param", [({"temperature": 3}, "temperature"), ({"n": 0}, "n"), ({"top_p": 0}, "top_p"),
                                       ({"max_tokens": 0}, "max_tokens"), ({"n": 99}, "n"),
                                       ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
                                       ({"messages": []}, "messages"), ({"model": None}, "model"),
                                       ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
                                       ({"stop": ["a", None]}, "stop.1"),  # (not "stop.str": a union's branch)
                                       ({"messages": [{"role": "user", "content": [
                                           {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
                                        "messages.0.content.0.type"),
                                       ({"logprobs": True}, "logprobs"),  # refused, not answered without them
                                       ({"top_logprobs": 3}, "top_logprobs")])
def test_bad_parameters_are_400_with_the_parameter_named(api, bad, param, client):
    body = {"model": "tiny", "messages": HELLO, **bad}
    if body["model"] is None:
        del body["model"]
    resp = httpx.post(api.url + "/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and param.split(".")[0] in err["message"]
    if "model" in body:  # (the official client itself refuses to send a request without a model)
        with pytest.raises(openai.BadRequestError):  # the official client raises its 400 error
            client(api).chat.completions.create(**body)


@pytest.mark.parametrize("content,headers", [(b"", {}), (b"[1, 2]", {}), (b'"hi"', {}),
                                             (json.dumps({"model": "tiny", "messages": HELLO}).encode(),
                                              {"content-type": "application/x-www-form-urlencoded"})])
def test_a_body_that_is_not_a_json_object_is_a_400_that_says_so(api, content, headers):
    resp = httpx.post(api.url + "/v1/chat/completions", content=content, headers=headers, timeout=60)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["param"] is None and err["message"].startswith("The request body must be a JSON object")


def test_a_tiny_temperature_samples_the_greedy_answer(api, client):
    c = client(api)
    greedy = ask(c, HELLO, temperature=0).choices[0].message.content
    for t in (1e-6, 1e-40):  # 1e-40: logits / t overflow to inf, and inf - inf made the softmax nan (a 500)
        assert ask(c, HELLO, temperature=t, seed=1).choices[0].message.content == greedy


def test_api_keys(tiny_model, client, serve):
    with serve(tiny_model, cfg=ServeConfig(api_keys=("sk-right-key-123",))) as s:
        with pytest.raises(openai.AuthenticationError) as e:
            client(s, "sk-wrong-key-456").models.list()
        assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
        assert "sk-wrong-key-456" not in e.value.message  # the key is masked
        assert httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": HELLO},
                          timeout=60).status_code == 401
        r = ask(client(s, "sk-right-key-123"), HELLO, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(s.url + "/", timeout=60).status_code == 200  # the chat page itself is public


def test_over_capacity_is_429_and_a_disconnected_stream_frees_its_slot(rambling_model, client, serve):
    with serve(rambling_model, cfg=ServeConfig(max_batch=1, max_queue=1, retry_after=3, client_share=1.0)) as s:
        c = client(s)
        long = dict(temperature=0, max_tokens=1000)
        first = ask(c, HELLO, stream=True, **long)
        assert next(iter(first)).choices[0].delta.role == "assistant"
        waiting = ThreadPoolExecutor(1).submit(ask, c, PROMPTS[0], temperature=0, max_tokens=4)
        end = time.monotonic() + 10
        while s.engine.load()["queued"] < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:  # 1 running + 1 waiting: the third is turned away at once
            ask(c, PROMPTS[1])
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "3"
        assert e.value.code == "rate_limit_exceeded"
        first.close()  # the client goes away mid-stream
        assert waiting.result(timeout=30).choices[0].finish_reason in ("stop", "length")
        stats = s.engine.load()
        assert stats["cancelled"] == 1 and stats["running"] == 0
        assert stats["tokens"] < 1000  # the abandoned answer stopped early


def test_n_is_capped_by_the_batch_size(tiny_model, client, serve):
    # a request's n choices are generated together: more than serve.max_batch can never run
    with serve(tiny_model, cfg=ServeConfig(max_batch=2, max_queue=1)) as s:
        c = client(s)
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, HELLO, n=3, max_tokens=2)
        assert e.value.param == "n" and "at most 2 choices" in e.value.message
        assert len(ask(c, HELLO, n=2, max_tokens=2).choices) == 2


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, capsys):
    """`cherrytop serve` and `cherrytop label serve` on a busy port: one error line, nothing claiming
    to serve (the checkpoint is not even looked at)."""
    import socket

    from cherrytop.cli import main
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path / "none"), f"--serve.port={port}"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port\n"
        assert main(["label", "serve", "--db", f"sqlite:///{tmp_path / 'fb.db'}", "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port\n"


def test_one_client_cannot_take_every_slot(parrot_model, client, serve):
    """serve.client_share: with 1 running + 3 waiting slots and a share of 0.5, one API key holds at
    most 2; its third request is a 429 naming its share while another key's request still gets in."""
    keys = ("sk-first-client-1", "sk-other-client-2")
    with serve(parrot_model, cfg=ServeConfig(max_batch=1, max_queue=3, api_keys=keys, retry_after=2)) as s:
        greedy = client(s, keys[0])
        first = ask(greedy, HELLO, stream=True, temperature=0, max_tokens=8000)
        assert next(iter(first)).choices[0].delta.role == "assistant"
        waiting = ThreadPoolExecutor(1).submit(ask, greedy, HELLO, temperature=0, max_tokens=2)
        end = time.monotonic() + 10
        while s.engine.load()["queued"] < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            ask(greedy, HELLO, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "2" and "your share" in e.value.message
        other = ThreadPoolExecutor(1).submit(ask, client(s, keys[1]), HELLO, temperature=0, max_tokens=2)
        while s.engine.load()["queued"] < 2:  # the other client's request was let in, and waits its turn
            assert time.monotonic() < end and not other.done(), other.exception() if other.done() else None
            time.sleep(0.01)
        first.close()
        assert other.result(timeout=30).choices[0].message.content == "hello hello"
        assert waiting.result(timeout=30).choices[0].message.content == "hello hello"
        assert ask(greedy, HELLO, temperature=0, max_tokens=1).choices[0].message.content == "hello"  # share freed


def test_a_huge_body_is_413_while_health_answers_within_100_ms(tiny_model, serve):
    """A 20 MB chat request used to be read, parsed and tokenized on the event loop (~20 s in which
    nothing else was answered). Now its Content-Length alone gets a 413, and /health keeps answering."""
    huge = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello " * 3_500_000}]}).encode()
    assert len(huge) > 20_000_000
    with serve(tiny_model, cfg=ServeConfig()) as s:
        results = {}

        def post():
            try:
                results["status"] = httpx.post(s.url + "/v1/chat/completions", content=huge, timeout=120,
                                               headers={"content-type": "application/json"}).status_code
            except httpx.HTTPError as e:  # (the server may close the connection before all was sent)
                results["error"] = e
            results["status"] = results.get("status")

        took = []
        with httpx.Client(base_url=s.url, timeout=10) as h:
            h.get("/health")  # the connection is open before timing starts
            thread = threading.Thread(target=post)
            thread.start()
            while thread.is_alive():
                t = time.perf_counter()
                assert h.get("/health").status_code == 200
                took.append(time.perf_counter() - t)
                time.sleep(0.005)
            thread.join()
        assert results["status"] == 413, results
        # the typical answer within 100 ms (the bound); no answer stalled the way the old event loop
        # did for ~20 s (a single probe on a loaded CI machine may lose a scheduler slice, hence the median)
        took.sort()
        assert took[len(took) // 2] < 0.1 and took[-1] < 1.0, f"/health took {[round(x * 1000) for x in took]} ms"
        # without a Content-Length (chunked), the body is refused once what was read passes the limit
        r = httpx.post(s.url + "/v1/chat/completions", content=iter([b"x" * 65536] * 40), timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "at most 1048576 bytes" in r.json()["error"]["message"]


def test_a_prompt_longer_than_any_tokenization_could_fit_is_refused_before_tokenizing(tiny_model, serve):
    from cherrytop.serve.app import longest_token
    _, tok = tiny_model
    bound = CONTEXT * longest_token(tok)
    with serve(tiny_model, cfg=ServeConfig()) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "x" * (bound + 1)}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"maximum context length is {CONTEXT} tokens" in err["message"] and f"{bound + 1} characters" in err["message"]


def test_a_slow_tokenization_never_holds_the_event_loop(tiny_model, serve, monkeypatch):
    """Tokenizing (and moderating) a prompt runs in a worker thread: while one request's prompt takes
    seconds to tokenize, /health and other requests are still answered at once (the old server
    tokenized on the event loop, so everything waited for it)."""
    import cherrytop.serve.app as serve_app
    real, started = serve_app.encode_prompt, threading.Event()

    def slow(tokenizer, messages):
        if messages[-1]["content"] == "slow":
            started.set()
            time.sleep(2.0)  # blocks whichever thread tokenizes
        return real(tokenizer, messages)
    monkeypatch.setattr(serve_app, "encode_prompt", slow)
    with serve(tiny_model, cfg=ServeConfig()) as s:
        pending = ThreadPoolExecutor(1).submit(httpx.post, s.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "slow"}], "max_tokens": 2})
        assert started.wait(10)
        t = time.perf_counter()
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        r = httpx.post(s.url + "/v1/chat/completions", timeout=10, json={"model": "tiny", "messages": HELLO,
                                                                         "max_tokens": 2})
        assert r.status_code == 200 and time.perf_counter() - t < 1.0, time.perf_counter() - t  # not after it
        assert pending.result(timeout=60).status_code == 200


def test_security_headers_and_no_inline_script(api):
    """A Content-Security-Policy that allows only the server's own script files (no inline script, no
    inline event handler), and a chat page that needs nothing else."""
    import re
    page = httpx.get(api.url + "/", timeout=60)
    for r in (page, httpx.get(api.url + "/v1/models", timeout=60), httpx.get(api.url + "/nope", timeout=60)):
        csp = r.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/chat.js" defer>']
    assert not re.search(r"\son\w+\s*=", html) and "<style" not in html and "style=" not in html
    for path, kind in (("/static/chat.js", "javascript"), ("/static/chat.css", "text/css")):
        r = httpx.get(api.url + path, timeout=60)
        assert r.status_code == 200 and kind in r.headers["content-type"]


def test_a_server_open_to_the_network_without_api_keys_warns_at_start(tmp_path, capsys, monkeypatch):
    from cherrytop.cli import main
    from cherrytop.serve.app import exposure_warning
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        assert "anyone who can reach this port" in exposure_warning(host, set())
    for host, keys in (("127.0.0.1", set()), ("::1", set()), ("localhost", set()), ("0.0.0.0", {"sk-x"})):
        assert exposure_warning(host, keys) is None
    monkeypatch.delenv("CHERRYTOP_API_KEYS", raising=False)
    assert main(["serve", "--checkpoint", str(tmp_path / "none"), "--serve.host=0.0.0.0", "--serve.port=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: listening on 0.0.0.0 with no API keys") and err.count("\n") == 2


def test_forwarded_headers_are_read_only_from_a_trusted_proxy(monkeypatch):
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: a local client could claim any address and
    dodge the per-client limits. cherrytop serve reads the headers only from the proxies it is told of."""
    from cherrytop.serve.app import proxy_settings
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert proxy_settings(ServeConfig()) == {"proxy_headers": False}
    assert proxy_settings(ServeConfig(forwarded_allow_ips="10.0.0.5")) == {"proxy_headers": True,
                                                                           "forwarded_allow_ips": "10.0.0.5"}
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.6")
    assert proxy_settings(ServeConfig())["forwarded_allow_ips"] == "10.0.0.6"
