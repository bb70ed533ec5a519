"""`rl.reward`: a rule-based reward function (`rl.reward_fn` = module:function), the reward model, or a weighted
sum of both (rl/rewards.py). One-line errors naming the prompt; a function-only GRPO run on the test preset;
the mixed score against a hand computation; the world's grader function against `cherrytop eval`'s graders."""

import copy
import json
import math
import sys

import pytest
import torch

from cherrytop.config import ConfigError, ModelConfig, PPOConfig, load_config
from cherrytop.model.load import build_model
from cherrytop.rl import rewards
from cherrytop.rl.rewards import Reward, RewardError, load_function
from cherrytop.stages.ppo import rollout

from .test_ppo import ppo_inputs

RULES = '''
import math

def words(messages, answer):
    return float(len(answer.split()))

def raises(messages, answer):
    if "no idea" in messages[-1]["content"]:
        raise ValueError("no rule for\\nthis prompt")
    return 1.0

def nan(messages, answer):
    return math.nan

def text(messages, answer):
    return "1.0"

def nothing(messages, answer):
    return None

not_a_function = 3
'''


@pytest.fixture
def rules(tmp_path, monkeypatch):
    """A module `myrules` of reward functions, importable for the test."""
    (tmp_path / "myrules.py").write_text(RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("myrules", None)


@pytest.mark.parametrize("spec, says", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    ("myrules:missing", "module 'myrules' has no attribute 'missing'"),
    ("myrules:not_a_function", "'not_a_function' in module 'myrules' is a int, not a function"),
])
def test_a_function_that_cannot_be_imported_is_one_line(rules, spec, says):
    with pytest.raises(RewardError) as e:
        load_function(spec)
    assert str(e.value).startswith(f"rl.reward_fn={spec}: ") and says in str(e.value) and "\n" not in str(e.value)
    assert load_function("myrules:words")([], "a b c") == 3.0


@pytest.mark.parametrize("overrides, says", [
    (["--rl.reward=function"], "rl.reward_fn: expected module:function (e.g. cherrytop.world.reward:graded) with "
                               "rl.reward=function, got ''"),
    (["--rl.reward=both", "--rl.reward_fn=no_colon"], "rl.reward_fn: expected module:function"),
    (["--rl.reward_fn=myrules:words"], "rl.reward_fn: expected empty with rl.reward=model (to use the function, "
                                       "pass --rl.reward=function or --rl.reward=both)"),
    (["--rl.reward=rm"], "rl.reward: expected model, function or both, got 'rm'"),
    (["--rl.reward_fn_weight=0"], "rl.reward_fn_weight: expected a weight > 0"),
    (["--rl.reward_model_weight=nan"], "rl.reward_model_weight: expected a weight > 0"),
])
def test_reward_settings_are_checked_in_one_line(overrides, says):
    with pytest.raises(ConfigError) as e:
        load_config("test", overrides=overrides)
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("fn, says", [
    ("raises", r"raised ValueError on \S+prompts.jsonl:7: no rule for this prompt"),
    ("nan", r"returned nan on \S+prompts.jsonl:\d+; expected a finite number"),
    ("text", r"returned str '1.0' on \S+prompts.jsonl:\d+; expected a number \(float\)"),
    ("nothing", r"returned NoneType None on \S+prompts.jsonl:\d+; expected a number \(float\)"),
])
def test_a_failing_function_stops_ppo_with_one_line_naming_the_prompt(tmp_path, rules, capsys, fn, says):
    """`cherrytop ppo --rl.reward=function` (PPO: its value model starts from the policy, no reward model is
    loaded) with a function that raises on the prompt of line 7, or returns NaN or no number."""
    import re

    from cherrytop.cli import main
    ppo_inputs(tmp_path, ["what is 12 plus 3 ?"] * 6 + ["no idea ?"] + ["what is 3 plus 3 ?"] * 9, n_layers=1)
    assert main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--ppo.init={tmp_path / 'init'}",
                 f"--ppo.reward_model={tmp_path / 'no_rm'}", f"--ppo.prompts={tmp_path / 'prompts.jsonl'}",
                 "--rl.reward=function", f"--rl.reward_fn=myrules:{fn}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: rl.reward_fn=myrules:{fn} {says}", err), err


def test_built_in_prompts_are_named_by_number():
    r = Reward(None, lambda messages, answer: math.inf if answer == "b" else 1.0, spec="m:f", prompts=[[{"role": "user", "content": "q"}]] * 3)
    with pytest.raises(RewardError, match=r"^rl.reward_fn=m:f returned inf on built-in prompt 3; expected a finite number$"):
        r.function_scores([0, 2], ["a", "b"])


def test_a_function_only_grpo_run_trains_on_the_world_graders(tmp_path, monkeypatch, capsys):
    """`cherrytop ppo --rl.algorithm=grpo --rl.reward=function --rl.reward_fn=cherrytop.world.reward:graded` on
    the test preset's world prompts: no reward model is loaded (nor a value model), the policy moves, and the
    function's mean is logged apart (no reward-model part). The run has no `rm` stage: none is asked for."""
    from safetensors.torch import load_file

    from cherrytop.cli import main
    from cherrytop.stages import ppo
    from cherrytop.world import World
    tasks = [t for t in World(load_config("test").world).prompts() if len(t.messages) == 1
             and len(t.messages[0]["content"]) < 60][:16]
    assert len(tasks) == 16
    ppo_inputs(tmp_path, [t.messages[0]["content"] for t in tasks], n_layers=1)
    monkeypatch.setattr(ppo, "scalar_model_from", lambda *a, **k: pytest.fail("a reward or value model was loaded"))
    assert main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--ppo.init={tmp_path / 'init'}",
                 f"--ppo.prompts={tmp_path / 'prompts.jsonl'}",  # ppo.reward_model=rm, a stage this run never trained
                 "--rl.algorithm=grpo", "--rl.reward=function", "--rl.reward_fn=cherrytop.world.reward:graded"]) == 0
    assert "reward function cherrytop.world.reward:graded" in capsys.readouterr().err.replace("\n", "")
    logs = [json.loads(r) for r in (tmp_path / "runs" / "test" / "logs" / "ppo.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(math.isfinite(v) for row in logs for v in row.values())
    assert all(0 <= row["objective/fn_score"] <= 1 and "objective/rm_score" not in row for row in logs)
    before, after = load_file(tmp_path / "init" / "model.safetensors"), \
        load_file(tmp_path / "runs" / "test" / "ppo" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


V, PAD, EOS = 24, 0, 1


class Tok:
    pad_token_id, eos_token_id = PAD, EOS

    @staticmethod
    def decode(ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


def test_the_mixed_score_is_the_weighted_sum_of_its_parts(tmp_path):
    """rl.reward=both: each episode's score is w_rm · rm + w_fn · fn (an answer without EOS gets the penalty),
    recomputed here from the batch's tokens; each part's mean is logged unweighted."""
    torch.manual_seed(0)
    policy = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=64), V, PAD, EOS, seed=0)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    p = PPOConfig(batch_size=16, minibatch_size=8, micro_batch_size=8, max_new_tokens=6, no_eos_penalty=-3.0)

    def rm(ids, attn, pos, P):  # a "reward model": the response's token ids summed / 10
        return (ids[:, P:] * attn[:, P:]).sum(1).float() / 10

    def fn(messages, answer):  # a rule: answer words + the prompt's number
        return len(answer.split()) + int(messages[-1]["content"])
    prompts = [[{"role": "user", "content": str(i)}] for i in range(8)]
    prompt_idx = [i % 8 for i in range(16)]
    reward = Reward(0.5, fn, 2.0, "test:fn", prompts)
    prompt_ids = [[2 + i % 5, 3 + i % 7, 4] for i in prompt_idx]
    batch, stats = rollout(policy, ref, rm, None, Tok, prompt_ids, 0.1, p, torch.Generator().manual_seed(1),
                           m=rewards_method(), scoring=reward, prompt_idx=prompt_idx)
    P = batch.ids.shape[1] - batch.mask.shape[1]
    want, rm_parts, fn_parts = [], [], []
    for b in range(16):
        response = batch.ids[b, P:][batch.mask[b].bool()].tolist()
        eos = bool(response) and response[-1] == EOS
        words = [t for t in (response[:-1] if eos else response) if t != PAD]  # decoded without special tokens
        r = sum(response) / 10
        f = len(words) + prompt_idx[b]
        rm_parts.append(r)
        fn_parts.append(f)
        want.append(0.5 * r + 2.0 * f if eos else p.no_eos_penalty)
    assert stats["objective/score"] == pytest.approx(sum(want) / 16, rel=1e-6)
    assert stats["objective/rm_score"] == pytest.approx(sum(rm_parts) / 16, rel=1e-6)
    assert stats["objective/fn_score"] == pytest.approx(sum(fn_parts) / 16, rel=1e-6)
    assert any(w != p.no_eos_penalty for w in want)


def rewards_method():
    """GRPO with groups of 2 (no value model)."""
    from cherrytop.config import RLConfig
    from cherrytop.rl.experience import method
    return method(RLConfig(algorithm="grpo", group_size=2))


def test_score_episodes_weighs_the_reward_models_dense_term_and_reads_texts_only_for_a_function():
    head, f, mask = torch.tensor([1.0, -2.0]), torch.tensor([[0.5, 0.25], [1.0, 0.0]]), torch.ones(2, 2)
    h, g, stats = rewards.score_episodes(Reward(), head, f, mask, lambda: pytest.fail("decoded"))
    assert torch.equal(h, head) and torch.equal(g, f) and stats == {"objective/rm_score": pytest.approx(0.375)}
    r = Reward(3.0, lambda m, a: float(len(a)), 0.5, "t:f", [[{"role": "user", "content": "x"}]])
    h, g, stats = rewards.score_episodes(r, head, f, mask, lambda: ["ab", "abcd"], [0, 0])
    assert torch.equal(h, torch.tensor([3.0 + 1.0, -6.0 + 2.0])) and torch.equal(g, 3 * f)
    assert stats == {"objective/rm_score": pytest.approx(0.375), "objective/fn_score": 3.0}
    h, g, stats = rewards.score_episodes(Reward(None, r.fn, 0.5, "t:f", r.prompts), None, None, mask,
                                         lambda: ["ab", "abcd"], [0, 0])
    assert torch.equal(h, torch.tensor([1.0, 2.0])) and not g.any() and stats == {"objective/fn_score": 3.0}


def test_answers_are_decoded_up_to_eos():
    tokens = torch.tensor([[5, 6, EOS, PAD], [7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert rewards.answers(Tok, tokens, mask, torch.tensor([True, False])) == ["w5 w6", "w7 w8 w9 w10"]


def test_the_world_grader_function_agrees_with_the_graders_of_eval():
    """`cherrytop.world.reward:graded` = the share of the applicable axes that `cherrytop eval`'s scoring
    (eval.heldout.score) passes, on held-out tasks and the training prompts, for good and bad answers; a
    prompt that is no world task is a clear error."""
    from cherrytop.eval.heldout import AXES, score
    from cherrytop.world import World
    from cherrytop.world import reward as world_reward
    cfg = load_config("test")
    fn = load_function("cherrytop.world.reward:graded")
    world_reward.reward_setup(cfg)
    world = World(cfg.world)
    tasks = world.tasks("heldout", cfg.eval.n_tasks, "eval")[:11] + world.prompts()[:11]
    seen = set()
    for t in tasks:
        for answer in (t.meta["answer"], t.meta["answer"] + " i hope this helps .", t.meta["answer"] + " , you fool .",
                       "i do not know .", "i can not help with that .", ""):
            rates = score([t], [answer])
            axes = [rates[a] for a in AXES if rates[a] is not None]
            got = fn([dict(m) for m in t.messages], answer)
            assert got == sum(axes) / len(axes), (t.kind, answer, rates)
            seen.add(got)
    assert len(seen) >= 3  # the answers are told apart
    with pytest.raises(ValueError, match="not a prompt of the built-in world"):
        fn([{"role": "user", "content": "what is the capital of france ?"}], "paris")


def test_the_ray_driver_scores_episodes_as_the_single_process_does(monkeypatch):
    """`ppo_ray._score` (actors faked, `ray.get` the identity) with rl.reward=both: the same parts, weights and
    statistics as `rewards.score_episodes` on the same episodes."""
    import ray

    from cherrytop.stages import ppo_ray
    monkeypatch.setattr(ray, "get", lambda x: x)

    class Remote:
        def __init__(self, fn):
            self.remote = fn
    N = 3
    tokens, rmask = torch.tensor([[5, 6, EOS], [7, 8, 9]]), torch.tensor([[1, 1, 1], [1, 1, 1]])
    has_eos = torch.tensor([True, False])
    part = (torch.tensor([[2, 3], [0, 4]]), torch.tensor([[1, 1], [0, 1]]), tokens, rmask, has_eos,
            (-torch.ones(2, N), torch.ones(2, N)))
    rm = type("RM", (), {"score": Remote(lambda ids, attn, pos: torch.tensor([0.5, 1.5]))})()
    ref = type("Ref", (), {"logp": Remote(lambda ids, attn, pos, P, entropy=False: -torch.ones(2, N))})()
    value = type("V", (), {"values": Remote(lambda ids, attn, pos, P: torch.zeros(2, N))})()
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    scoring = Reward(2.0, lambda m, a: len(a.split()) + (m[-1]["content"] == "b"), 0.5, "t:f", prompts)
    _, stats = ppo_ray._score([part], None, ref, rm, value, Tok, 0.0, PPOConfig(no_eos_penalty=-1.0), scoring=scoring,
                              prompt_idx=[1, 0])
    # episode 1: 2.0 · 0.5 + 0.5 · (2 words + 1) = 2.5; episode 2 has no EOS: the penalty
    assert stats["objective/score"] == pytest.approx((2.5 - 1.0) / 2)
    assert stats["objective/rm_score"] == pytest.approx(1.0) and stats["objective/fn_score"] == pytest.approx((3 + 3) / 2)
