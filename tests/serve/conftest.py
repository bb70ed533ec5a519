"""A tiny random model with cherrytop's tokenizer and chat template, and a live server for it
(uvicorn in a thread on a free loopback port) that tests drive with the official `openai` client."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest
import torch
import uvicorn

from cherrytop.config import ModelConfig, ServeConfig
from cherrytop.data.tokenizer import encode_conversation, train_tokenizer
from cherrytop.model.load import build_model, load_model
from cherrytop.serve.app import create_app

CONTEXT = 256


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and the machine is shared (two threads on a busy
    machine made the fixture's training 20x slower); the setting is restored after each module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conversations() -> list[list[dict]]:
    """A few dozen chats (sums, greetings, colours) so the tiny model answers in words."""
    rng = random.Random(0)
    out = []
    for a in range(2, 30):
        b = rng.randint(2, 30)
        out.append([{"role": "user", "content": f"what is {a} plus {b} ?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b} ."}])
    for name in ("ann", "bob", "cid", "dan"):
        for colour in ("red", "blue", "green"):
            out.append([{"role": "user", "content": f"hello , i am {name} ."},
                        {"role": "assistant", "content": f"hello {name} , how can i help you today ?"}])
            out.append([{"role": "user", "content": f"what colour is the cat of {name} ?"},
                        {"role": "assistant", "content": f"the cat of {name} is {colour} ."}])
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A saved tiny Llama-style model folder with tokenizer and chat template, trained for 60 steps
    on a few chats (seconds), so it answers in words and ends its answers with EOS."""
    out = tmp_path_factory.mktemp("serve") / "tiny"
    convs = conversations()
    tok = train_tokenizer([m["content"] for c in convs for m in c] * 5, 300)
    model = build_model(ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, max_seq_len=CONTEXT),
                        vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=3)
    enc = [encode_conversation(tok, c, 64) for c in convs]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (session fixtures start before one_torch_thread)
    for _ in range(60):
        batch = rng.sample(enc, 8)
        L = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (L - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (L - len(lab)) for _, lab in batch])
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class LiveServer:
    """uvicorn serving an app in a background thread; `url` is its base URL."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < end, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def engine(self):
        return self.app.state.engine


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from cherrytop.data.tokenizer import load_tokenizer
    return load_model(tiny_ckpt), load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="session")
def serve():
    """serve((model, tokenizer), cfg=ServeConfig(...), ...) -> a LiveServer (a context manager) of
    create_app for that model under the name `tiny`."""
    def make(model_and_tok, **kwargs):
        model, tok = model_and_tok
        kwargs.setdefault("cfg", ServeConfig())
        return LiveServer(create_app(model, tok, model_name="tiny", **kwargs))
    return make


@pytest.fixture(scope="session")
def rambling_model(tiny_model):
    """An untrained model with an 8192-token window: greedy, it rambles without EOS (long answers that
    hold a batch slot), which the capacity and disconnect tests need (a 1000-token answer could end in
    under a second on an idle machine, before the disconnect test's client gave up)."""
    _, tok = tiny_model
    model = build_model(ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, max_seq_len=8192),
                        vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=5)
    return model.eval(), tok


@pytest.fixture(scope="session")
def parrot_model(tiny_model):
    """A GPT-2-style model with an 8192-token window that greedily says " hello" for ever: its final
    layer norm outputs the word's embedding whatever the input (weight 0, bias = that embedding), so
    the tied output layer scores "hello" highest at every step. Unlike rambling_model (whose text may
    sit held back as an incomplete character), every step streams text to the client."""
    _, tok = tiny_model
    model = build_model(ModelConfig(arch="gpt2", n_layers=2, d_model=64, n_heads=2, d_ff=128, max_seq_len=8192),
                        vocab_size=len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, seed=6).eval()
    word = tok.encode(" hello", add_special_tokens=False)[-1]
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.lm_head.weight[word])
    return model, tok


@pytest.fixture(scope="session")
def client():
    """client(server, key) -> the official openai client for a LiveServer (no retries)."""
    import openai

    def make(server, key: str = "unused"):
        return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
    return make
