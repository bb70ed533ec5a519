"""The memory planner against numbers computed by hand for a small Llama config, and the CLI."""

import json

import pytest

from cherrytop.cli import main
from cherrytop.plan import Options, Workload, plan, read_config, shape

SMALL = {"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 64}
W = Workload(micro_batch=2, seq_len=8, rollout_batch=3, lora_r=2)  # 16 tokens per micro-batch

# By hand: embedding 100·16 = 1600; per layer q,k,v,o 4·16·16 = 1024, gate+up 2·16·32 = 1024, down 512,
# 2 norms 32 -> 2592; 2 layers + final norm 16 -> 6800 (the head is tied to the embedding).
PARAMS, BLOCK = 6800, 2592
# LoRA rank 1 on every linear but the head: 4·(16+16) + 2·(16+32) + (32+16) = 272 per layer -> 544.
LORA1 = 544
# Activation bytes per token and layer: 11h + 4h + (2h + 6f) = 176 + 64 + 224 = 464; logits 6·V = 600.
PER_LAYER, LOGITS = 464, 600


@pytest.fixture(scope="module")
def small():
    return shape(SMALL)


def test_shape_counts(small):
    assert (small.params, small.block_params, small.lora_params) == (PARAMS, BLOCK, LORA1)
    assert (small.layers, small.hidden, small.ffn, small.gated, small.kv_heads, small.head_dim) == (2, 16, 32, True, 2, 8)


def test_sft_plain_lora_fsdp_checkpointing(small):
    (m,) = plan(small, "sft", 1, 1.0, Options(), W).models
    assert (m.weights, m.grads, m.optimizer) == (4 * PARAMS, 4 * PARAMS, 8 * PARAMS)
    assert m.activations == (2 * PER_LAYER + LOGITS) * 16 == 24448
    assert m.total == 133248
    (m,) = plan(small, "sft", 1, 1.0, Options(lora=True), W).models
    trainable = 2 * LORA1  # rank 2
    assert (m.weights, m.grads, m.optimizer) == (4 * (PARAMS + trainable), 4 * trainable, 8 * trainable)
    (m,) = plan(small, "sft", 2, 1.0, Options(fsdp=True), W).models
    assert (m.weights, m.grads, m.optimizer) == (4 * PARAMS / 2 + 4 * 2 * BLOCK, 4 * PARAMS / 2, 8 * PARAMS / 2)
    (m,) = plan(small, "sft", 2, 1.0, Options(fsdp=True, offload=True), W).models
    assert (m.weights, m.grads, m.optimizer, m.cpu) == (8 * BLOCK, 0, 0, 16 * PARAMS / 2)
    (m,) = plan(small, "sft", 1, 1.0, Options(grad_checkpointing=True), W).models
    assert m.activations == (2 * 2 * 16 + PER_LAYER + LOGITS) * 16


def test_ppo_models_and_kv_cache(small):
    p = plan(small, "ppo", 1, 1.0, Options(), W)
    assert [m.role for m in p.models] == ["policy", "reference", "reward", "value"]
    policy, ref, rm, value = p.models
    assert policy.kv_cache == 2 * 2 * 2 * 2 * 8 * 8 * 3  # k,v · bf16 · layers · kv heads · head dim · tokens · batch
    assert ref.grads == rm.grads == ref.optimizer == 0 and ref.weights == rm.weights == 2 * PARAMS  # bf16
    assert policy.weights == value.weights == 4 * PARAMS  # trained: fp32
    fp32 = plan(small, "ppo", 1, 1.0, Options(), W, frozen_bytes=4).models  # --dist.frozen_dtype=fp32
    assert [m.weights for m in fp32] == [4 * PARAMS] * 4 and fp32[1].total - ref.total == 2 * PARAMS
    assert ref.activations == (PER_LAYER + LOGITS) * 16 and rm.activations == PER_LAYER * 16
    assert value.activations == 2 * PER_LAYER * 16 and value.optimizer == 8 * PARAMS
    lora = plan(small, "ppo", 1, 1.0, Options(lora=True), W)
    assert [m.role for m in lora.models] == ["policy", "reward", "value"]  # reference = adapter off, no copy
    sharded = plan(small, "ppo", 2, 1.0, Options(fsdp=True), W).models  # FSDP shards the frozen models too
    for m in sharded:
        wb = 4 if m.trained else 2
        assert m.weights == wb * PARAMS / 2 + wb * 2 * BLOCK, m.role
    assert [m.optimizer for m in sharded] == [8 * PARAMS / 2, 0, 0, 8 * PARAMS / 2]
    free = plan(small, "ppo", 1, 1.0, Options(), W, critic=False)  # --rl.algorithm=grpo etc.: no value model
    assert [m.role for m in free.models] == ["policy", "reference", "reward"]
    assert p.total - free.total == value.total


def test_plan_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    assert read_config(tmp_path)["hidden_size"] == 16
    assert main(["plan", "--model", str(tmp_path), "--stage", "sft", "--gpus", "1", "--gpu-mem", "1"]) == 0
    out = capsys.readouterr().out
    assert "0.000B parameters" in out and "fits with: plain (full fine-tuning on one GPU)" in out and "DDP" not in out
    assert main(["plan", "--model", str(tmp_path), "--stage", "ppo", "--gpus", "1", "--frozen-dtype", "fp32"]) == 0
    assert "frozen models in fp32" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--stage", "ppo", "--gpus", "1", "--rl.algorithm=grpo"]) == 0
    out = capsys.readouterr().out
    assert "no value model (critic-free --rl.algorithm)" in out and "\nvalue " not in out
    assert main(["plan", "--model", str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_lora_count_is_what_peft_adapts():
    """Phi-3 fuses its gated MLP into gate_up_proj; Falcon's linear layers subclass nn.Linear: the
    planner counts the adapters peft's all-linear attaches, and Phi-3's MLP as a gated one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cherrytop.config import load_config
    from cherrytop.model import lora
    phi3 = {**SMALL, "model_type": "phi3", "pad_token_id": 0}
    falcon = {"model_type": "falcon", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = load_config("test", [], ["--lora.r=2"])
    for config in (phi3, falcon):
        c = dict(config)
        torch.manual_seed(0)
        model = lora.attach(AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c)), cfg)
        assert shape(config).lora_params * 2 == lora.trainable_fraction(model)[0], config["model_type"]
    assert shape(phi3).gated and not shape(falcon).gated


MIXTRAL = {**SMALL, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}


@pytest.mark.parametrize("config, says", [
    ([1, 2], "config.json holds a JSON list; expected an object"),
    ({"model_type": "foo_bar"}, "unknown model_type 'foo_bar'"),
    ({**SMALL, "num_attention_heads": 3}, "not a valid llama config: ValueError: The hidden size (16) is not a multiple"),
    ({"model_type": "t5"}, "model_type 't5' is not a transformer causal LM"),
    ({"model_type": "mamba", "hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 100}, "'mamba' is not a transformer"),
    (MIXTRAL, "'mixtral' is a mixture-of-experts model"),
])
def test_a_config_the_planner_cannot_model_is_one_line(tmp_path, capsys, config, says):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.startswith("error: ") and err.count("\n") == 1, err[:300]


def test_scaling_doc_matches_the_planner():
    """docs/scaling.md's plan table is what the planner says for the configs printed there."""
    import re
    from pathlib import Path

    from cherrytop.plan import GiB, all_options
    doc = (Path(__file__).parents[2] / "docs" / "scaling.md").read_text()
    configs = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", doc)]
    shapes = {"7b": shape(configs[0]), "70b": shape(configs[1])}
    assert round(shapes["7b"].params / 1e9, 3) == 6.738 and round(shapes["70b"].params / 1e9, 3) == 68.977
    table = doc.split("<!-- plan-table")[1].split("\n\n")[0]
    rows = re.findall(r"^\| (7b|70b) \| (\w+) \| (\d+) \| ([^|]+) \| ([\d.]+) \|$", table, re.M)
    assert len(rows) == 8
    for model, stage, gpus, label, total in rows:
        plans = [plan(shapes[model], stage, int(gpus), 80 * 0.9, o, Workload(), 1024 * 0.9) for o in all_options(stage)]
        best = next(p for p in plans if p.fits)
        assert best.options.label() == label.strip(), (model, stage, gpus)
        assert f"{best.total / GiB:.2f}" == total, (model, stage, gpus)


def test_kv_heads_and_attention_width_as_the_model_builds_them():
    """The KV cache and the attention activations follow the key/value projections the model really
    has: Falcon-7B's multi-query attention has one KV head (its config's num_kv_heads is ignored
    without the new decoder architecture), Falcon-40B's new architecture has num_kv_heads, and Gemma's
    heads are wider than its hidden size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cherrytop.plan import activation_bytes_per_token
    falcon = {"model_type": "falcon", "vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4}
    cases = [({**falcon, "multi_query": True, "num_kv_heads": 4}, 1),
             ({**falcon, "multi_query": False}, 4),
             ({**falcon, "new_decoder_architecture": True, "num_kv_heads": 2}, 2),
             ({**SMALL, "num_key_value_heads": 1}, 1),
             ({"model_type": "gpt2", "vocab_size": 100, "n_embd": 16, "n_layer": 2, "n_head": 4}, 4)]
    for config, kv in cases:
        c = dict(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
        s = shape(config)
        assert s.kv_heads == kv, config
        # the key and value projections' output width, from the model's own layers
        if config["model_type"] == "falcon":
            qkv = model.transformer.h[0].self_attention.query_key_value.weight.shape[0]
            assert qkv == (s.heads + 2 * kv) * s.head_dim, config
        elif config["model_type"] == "llama":
            assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == kv * s.head_dim
    gemma = {"model_type": "gemma", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    g = shape(gemma)
    assert (g.heads * g.head_dim, g.kv_heads * g.head_dim) == (32, 16)
    h, f = 16, 32  # 2h input + 2a queries + 4k keys/values + 2a projection input + h mask; 4h norms; gated MLP
    assert activation_bytes_per_token(g, False, False, lm=False) == 2 * h + 2 * 32 + 4 * 16 + 2 * 32 + h + 4 * h + 2 * h + 6 * f
