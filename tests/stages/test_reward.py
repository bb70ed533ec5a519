"""Reward model: one forward pass per prompt group, and its loss equals the explicit pair mean."""

import math

import pytest
import torch

from cherrytop.config import ModelConfig
from cherrytop.data.records import Comparison, Message
from cherrytop.data.tokenizer import train_tokenizer
from cherrytop.model.heads import reward, scalar_model_from
from cherrytop.model.load import build_model
from cherrytop.stages.reward import collate_groups, encode_group, rm_step


def test_k_responses_go_through_one_forward_and_loss_matches_pairs(tmp_path):
    tok = train_tokenizer(["the cat is red .", "i do not know .", "sorry , no ."] * 10, vocab_size=300)
    lm = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), len(tok),
                     tok.pad_token_id, tok.eos_token_id)
    lm.save_pretrained(tmp_path)
    rm = scalar_model_from(tmp_path, tok.pad_token_id)
    prompt = (Message("user", "what color is the cat ?"),)
    comps = [Comparison(prompt, ("red .", "i do not know .", "the cat is red .", "sorry , no ."), (2, 0, 1, 3)),
             Comparison(prompt, ("no .", "red ."), (1, 0))]
    batch = collate_groups([(encode_group(tok, c, 64), c) for c in comps], tok.pad_token_id, 1.0)
    calls = []
    trunk = rm.model
    hook = trunk.register_forward_hook(lambda mod, args, out: calls.append(out.last_hidden_state.shape[0]))
    loss_sum, n = rm_step(rm, batch)
    hook.remove()
    assert calls == [6]  # one pass over all 4 + 2 responses, not one per pair
    # reference: score each response alone, then average log σ(r_w − r_l) over every pair
    expected = 0.0
    for c in comps:
        r = []
        for resp in c.responses:
            ids = torch.tensor([encode_group(tok, Comparison(prompt, (resp, resp), (0, 1)), 64)[0]])
            r.append(float(reward(rm, ids, torch.ones_like(ids), normalised=False).detach()))
        pairs = [(c.ranking[i], c.ranking[j]) for i in range(c.k) for j in range(i + 1, c.k)]
        expected += -sum(math.log(1 / (1 + math.exp(-(r[w] - r[l])))) for w, l in pairs) / len(pairs)
    assert int(n) == 2
    assert float(loss_sum.detach()) == pytest.approx(expected, rel=1e-4)  # rm_step returns the sum over prompts
