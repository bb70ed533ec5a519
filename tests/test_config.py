"""Config: presets, TOML files, dotted overrides, validation errors, the saved copy reloads."""

import pytest

from cherrytop.config import Config, ConfigError, describe, from_toml_file, load_config, to_toml


def test_layers_and_round_trip(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[sft]\nlr = 0.5\nmax_steps = 3\n[run]\nname = "x"\n')
    cfg = load_config("test", [f], ["--sft.max_steps=7", "--model.arch", "gpt2", "--run.name=demo"])
    assert cfg.sft.lr == 0.5 and cfg.sft.max_steps == 7 and cfg.model.arch == "gpt2" and cfg.run.name == "demo"
    assert cfg.model.d_model == 64  # from the test preset
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(cfg))
    assert from_toml_file(saved) == cfg
    with pytest.raises(Exception):
        cfg.sft.lr = 1.0  # frozen


@pytest.mark.parametrize("files,over,match", [
    ([], ["--sft.lrr=1"], "unknown key 'lrr' \\(did you mean 'lr'\\?\\)"),
    ([], ["--sftt.lr=1"], "unknown section 'sftt' \\(did you mean 'sft'\\?\\)"),
    ([], ["--sft.lr=fast"], "sft.lr: expected a number, got 'fast'"),
    ([], ["--sft.max_steps=1.5"], "sft.max_steps: expected an integer"),
    ([], ["--sft.packing=yes"], "sft.packing: expected true or false"),
    ([], ["--pretrain.batch_size=10", "--pretrain.micro_batch_size=4"], "must be a multiple"),
    ([], ["--model.arch=rnn"], "model.arch: expected 'llama' or 'gpt2'"),
    ([], ["--rm.edit_weight=-0.5"], "rm.edit_weight: expected a weight >= 0, got -0.5"),
    ([], ["--ppo.compile_decode=yes"], "ppo.compile_decode: expected 'auto', 'on' or 'off', got 'yes'"),
    ([], ["lr=3"], "expected --section.key=value"),
    (["missing.toml"], [], "missing.toml: config file not found"),
])
def test_errors_name_the_key_and_expectation(files, over, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", files, over)


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[sft]\nlr = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config("tiny", [f], [])
    f.write_text("[sft]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: sft: unknown key 'learning_rate'"):
        load_config("tiny", [f], [])


def test_every_field_is_documented():
    rows = describe(Config())
    assert rows and all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")
