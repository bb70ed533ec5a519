"""PPO with its models as Ray actors on this machine (a local Ray instance, CPU actors): the same
curve as the single-process stage 6 on the same seed, for PPO and for a critic-free algorithm with
PPO-ptx (so rollouts, scoring, both updates and the trainer -> rollout-worker weight sync are right);
the trainer actors' update of a batch is the single process's to the last bit; a Ray run stopped half
way (cleanly, or GRPO's killed with SIGKILL) resumes to the weights and logs of one that never stopped; (slow)
with LoRA, PPO and GRPO, no reference actor: the first rollout's KL to the reference (the policy with its
adapter off) is exactly 0, and only the adapters train."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from cherrytop.cli import main
from cherrytop.config import load_config
from cherrytop.rl.experience import method
from cherrytop.data.tokenizer import load_tokenizer
from cherrytop.model.heads import KIND_KEY, LOGLIK_KEY, REFERENCE_KEY, scalar_model_from

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("lora_tests", HERE / "test_lora.py")
lora_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_tests)
_spec = importlib.util.spec_from_file_location("killed_run", HERE / "killed_run.py")
killed_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killed_run)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    yield
    ray.shutdown()


def rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "logs/ppo.jsonl").read_text().splitlines()]


def setup(tmp_path, kind: str = "sum") -> list[str]:
    """A local Llama-style policy with its own template, a reward model from it (with a c · log π_ref
    term of `kind`, π_ref = the policy's start), prompts; the PPO flags."""
    base = lora_tests.chatml_llama(tmp_path)
    tok = load_tokenizer(base)
    rm = scalar_model_from(base, tok.pad_token_id)
    rm.config.update({LOGLIK_KEY: 0.3, REFERENCE_KEY: str(Path(base).resolve()), KIND_KEY: kind})
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["what is 12 plus 3 ?", "no idea ?"] * 8))
    common = ["--preset", "test", f"--run.out_dir={tmp_path / 'runs'}", f"--ppo.init={base}",
              f"--ppo.reward_model={tmp_path / 'rm'}", f"--ppo.prompts={prompts}", "--ppo.lr=0.01", "--ppo.value_lr=0.01",
              "--ppo.temperature=1"]  # Ray takes the c · log π_ref term from π_ref at T = 1 only
    return common


ALGORITHMS = {"ppo": [], "grpo": ["--rl.algorithm=grpo", "--ppo.ptx_coef=0.5", "--ppo.ptx_batch_size=2"],
              **{a: [f"--rl.algorithm={a}"] for a in ("dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")}}


@pytest.mark.slow  # ~120 s per algorithm on the shared 2 cores (Ray start-up and five actor processes); run with -m slow
# not rloo: its first update clips a few tokens more on Ray (the padded scoring's rounding moves ratios at the clip
# edge: clipfrac 0.103 vs 0.100), and iteration 2 then starts 0.25 % apart; test_ray_trainers_update_... is exact
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS if a != "rloo"])
def test_ppo_on_ray_matches_the_single_process_stage(tmp_path, ray_session, algorithm):
    """The same two iterations single-process and on Ray: GRPO (4 answers per prompt, the KL k3 in the loss,
    no value actor) with PPO-ptx, and PPO. Ray's rollout scoring passes run padded where the single process
    packs them, so the two agree to float rounding, not to the bit (`test_ray_trainers_update_...` is exact)."""
    common = setup(tmp_path) + ALGORITHMS[algorithm]
    assert main(["ppo", *common, "--run.name=single"]) == 0
    assert main(["ppo", *common, "--run.name=ray", "--ray.enabled=true"]) == 0
    a, b = rows(tmp_path / "runs/single"), rows(tmp_path / "runs/ray")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [16, 32]
    critic = algorithm == "ppo"
    m = method(load_config("test", [], [c for c in common if c not in ("--preset", "test")]).rl)
    keys = ["objective/score", "objective/ref_loglik", "objective/kl", "objective/entropy", "rollout/length",
            "loss/policy", "policy/clipfrac", "objective/beta"]
    keys += ["loss/value", "value/explained_variance"] if critic else []
    keys += ["loss/kl"] if m.kl_in == "loss" else []
    keys += ["loss/ptx"] if "--ppo.ptx_coef=0.5" in common else []
    keys += ["rollout/equal_groups"] if m.group_size > 1 else []
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    assert b[1]["objective/kl"] != 0.0  # iteration 2 sampled with the synced, trained weights
    assert a[0]["objective/ref_loglik"] < 0  # both added the reward model's log π_ref term
    ray_policy = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/ray/ppo")
    single = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "runs/single/ppo").named_parameters())
    for n, q in ray_policy.named_parameters():  # both saved the weight average (ppo.ema, on by default)
        assert torch.allclose(q, single[n], atol=1e-5), n
    base = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "base").named_parameters())
    assert any(not torch.equal(q, base[n]) for n, q in ray_policy.named_parameters())
    assert (tmp_path / "runs/ray/ppo/value").exists() == critic
    if critic:
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "runs/ray/ppo/value")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ray_trainers_update_as_the_single_process_does(tmp_path, algorithm):
    """The trainer actors' classes (called here without Ray, which they do not start) given the batch of a
    single-process rollout: the policy trainer (GRPO's KL loss term and PPO-ptx's LM loss in it) and, for PPO,
    the value trainer take the very optimizer steps of `ppo.update` and report the very same statistics."""
    from cherrytop.model import lora
    from cherrytop.model.load import load_model
    from cherrytop.rl.experience import initial_beta
    from cherrytop.stages import ppo
    from cherrytop.stages.ppo_ray import PolicyTrainer, ValueTrainer
    common = setup(tmp_path) + ALGORITHMS[algorithm]
    cfg = load_config("test", [], [c for c in common if c not in ("--preset", "test")])
    p, m, init, rm_path = cfg.ppo, method(cfg.rl), str(tmp_path / "base"), str(tmp_path / "rm")
    tok = load_tokenizer(init)
    torch.manual_seed(cfg.run.seed)
    policy = lora.prepare(load_model(init), cfg, "ppo")
    value = scalar_model_from(rm_path, tok.pad_token_id) if m.critic else None
    ref, rm, loglik = ppo.frozen_models(cfg, tmp_path / "base", tmp_path / "rm", tok.pad_token_id, policy, torch.device("cpu"))
    prompts = [ids for ids in ppo.encode_prompts(cfg, tok, None)[: p.batch_size // m.group_size] for _ in range(m.group_size)]
    beta = initial_beta(m, cfg)
    batch, _ = ppo.rollout(policy, ref, ppo.reward_score(rm), value, tok, prompts, beta, p, torch.Generator().manual_seed(0),
                           loglik, m=m)
    opt_pi, opt_v = ppo.adamw(policy, p.lr), ppo.adamw(value, p.value_lr) if value is not None else None
    ema = ppo.WeightEMA(policy, p.ema)
    windows = ppo.ptx_windows(cfg, tok, 128) if p.ptx_coef > 0 else None
    single = ppo.update(policy, value, opt_pi, opt_v, batch, p, windows, 0, cfg.run.seed, ema, m=m, beta=beta)
    pt = PolicyTrainer(cfg, init)
    on_ray = pt.train(batch, 0, beta)
    if m.critic:
        vt = ValueTrainer(cfg, rm_path, tok.pad_token_id)
        on_ray |= vt.train(batch, 0)
        assert all(torch.equal(a, b) for a, b in zip(value.parameters(), vt.model.parameters()))
    assert on_ray == single and ("loss/ptx" in single) == (p.ptx_coef > 0) and ("loss/kl" in single) == (m.kl_in == "loss")
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), pt.model.parameters()))
    assert all(torch.equal(ema.avg[n], pt.ema.avg[n]) for n in ema.avg)


@pytest.mark.slow  # ~150 s on the shared 2 cores (three Ray runs); run with -m slow
def test_a_ray_run_stopped_half_way_resumes_to_the_same_weights_and_logs(tmp_path, ray_session, capsys, monkeypatch):
    """PPO on Ray with two rollout workers, stopped after 2 of 4 iterations and started again, ends with the
    weights (policy, its live weights, the value model) and logs of a Ray run that never stopped: the
    optimizers, the weight average's live weights, β and every sampler's random stream are resumed. A Ray run
    that turns non-finite at iteration 2 names the checkpoint of iteration 1 as what is left."""
    from safetensors.torch import load_file

    from cherrytop.stages import ppo_ray
    from cherrytop.train.checkpoint import load_state
    common = setup(tmp_path) + ["--ray.enabled=true", "--ray.rollout_workers=2", "--ppo.save_every=1",
                                "--ppo.kl_target=1"]  # β adapts: it is resumed too
    assert main(["ppo", *common, "--run.name=whole", "--ppo.episodes=64"]) == 0
    assert main(["ppo", *common, "--run.name=stopped", "--ppo.episodes=32"]) == 0
    capsys.readouterr()
    assert main(["ppo", *common, "--run.name=stopped", "--ppo.episodes=64"]) == 0
    out = capsys.readouterr()
    said = (out.out + out.err).replace("\n", "")
    assert "resuming at iteration 2 of 4" in said and "ppo (ray) 3/4" in said and "ppo (ray) 1/4" not in said
    runs = tmp_path / "runs"
    for f in ("ppo/model.safetensors", "ppo/value/model.safetensors"):
        a, b = load_file(runs / "whole" / f), load_file(runs / "stopped" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    a, b = (load_state(runs / n / "ppo") for n in ("whole", "stopped"))
    assert all(torch.equal(a["live_policy"][k], b["live_policy"][k]) for k in a["live_policy"])
    assert all(torch.equal(x, y) for x, y in zip(a["ray_sampler_rng"], b["ray_sampler_rng"]))
    strip = [[{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows(runs / n)]
             for n in ("whole", "stopped")]
    assert len(strip[0]) == 4 and strip[0] == strip[1]
    assert len({r["objective/beta"] for r in strip[0]}) > 1

    real, calls = ppo_ray._score, []

    def score(*a, **k):  # the driver's second rollout reports a NaN score
        calls.append(1)
        batch, stats = real(*a, **k)
        return batch, ({**stats, "objective/score": float("nan")} if len(calls) == 2 else stats)
    monkeypatch.setattr(ppo_ray, "_score", score)
    assert main(["ppo", *common, "--run.name=nan", "--ppo.episodes=32"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "non-finite objective/score at iteration 2" in err
    assert f"the last good checkpoint (step 1) is in {runs / 'nan' / 'ppo'}" in err


@pytest.mark.slow  # ~15 s per algorithm on the shared 2 cores (a Ray run); run with -m slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_lora_ppo_on_ray_has_no_reference_actor(tmp_path, ray_session, algorithm):
    """With LoRA the first rollout's KL to the reference (the policy with its adapter off) is exactly 0;
    the adapters train and nothing else of the policy: the saved folder is the start's weights but for the
    adapted layers. GRPO: no value actor, no `value/`."""
    from safetensors.torch import load_file
    common = setup(tmp_path, kind="excess")  # the term's entropies come from the policy with its adapter off
    flags = ["--rl.algorithm=grpo"] if algorithm == "grpo" else []
    assert main(["ppo", *common, "--run.name=ray_lora", "--ray.enabled=true", "--lora.r=4", *flags]) == 0
    c = rows(tmp_path / "runs/ray_lora")
    assert c[0]["objective/ref_loglik"] != 0
    assert abs(c[0]["objective/kl"]) < 1e-4 < abs(c[1]["objective/kl"])
    out = tmp_path / "runs/ray_lora/ppo"
    adapter = load_file(out / "adapter/adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    adapted = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in adapter}
    start, saved = load_file(tmp_path / "base/model.safetensors"), load_file(out / "model.safetensors")
    assert start.keys() == saved.keys() and adapted <= start.keys()
    assert {k for k in start if not torch.equal(start[k], saved[k])} == adapted  # the base itself unchanged
    assert (out / "value").exists() == (algorithm == "ppo")


@pytest.mark.slow  # ~50 s on the shared 2 cores (three Ray runs, one killed); run with -m slow
def test_a_ray_grpo_run_killed_mid_run_resumes_to_the_same_weights_and_logs(tmp_path, ray_session):
    """GRPO on Ray with two rollout workers: the driver's process (and the Ray instance it started) killed
    with SIGKILL after the checkpoint of iteration 2 of 4, then started again, ends with the weights (the
    saved average, its live weights) and logs of a Ray run that never stopped."""
    from safetensors.torch import load_file

    from cherrytop.train.checkpoint import load_state
    common = setup(tmp_path) + ["--rl.algorithm=grpo", "--ray.enabled=true", "--ray.rollout_workers=2",
                                "--ppo.save_every=1", "--ppo.episodes=64", "--ppo.kl_target=1"]
    runs = tmp_path / "runs"
    assert main(["ppo", *common, "--run.name=whole"]) == 0
    killed_run.kill_after_checkpoint(["ppo", *common, "--run.name=killed"], runs / "killed/ppo", new_session=True)
    assert load_state(runs / "killed/ppo")["iteration"] < 4  # killed mid-run
    assert main(["ppo", *common, "--run.name=killed"]) == 0
    a, b = load_file(runs / "whole/ppo/model.safetensors"), load_file(runs / "killed/ppo/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_state(runs / "whole/ppo"), load_state(runs / "killed/ppo")
    assert sa["iteration"] == sb["iteration"] == 4
    assert all(torch.equal(sa["live_policy"][k], sb["live_policy"][k]) for k in sa["live_policy"])
    assert all(torch.equal(x, y) for x, y in zip(sa["ray_sampler_rng"], sb["ray_sampler_rng"]))
    strip = [[{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows(runs / n)]
             for n in ("whole", "killed")]
    assert len(strip[0]) == 4 and strip[0] == strip[1]
    assert not (runs / "killed/ppo/value").exists()
    assert [p.name for p in (runs / "killed").iterdir() if p.name.startswith(".")] == []  # the killed write's leftovers


def test_ray_scorers_hold_the_frozen_models_in_frozen_dtype(tmp_path):
    """The reward and reference actors' class (called here without Ray, which it does not start):
    with `dist.frozen_dtype=bf16` their weights are bf16 without gradients, and their scores and
    log-probs are the fp32 ones up to bf16 rounding (2 eps, as tests/stages/test_ppo.py argues)."""
    from cherrytop.config import DistConfig
    from cherrytop.stages.ppo_ray import Scorer
    import ray
    ray_before = ray.is_initialized()
    setup(tmp_path)
    tok = load_tokenizer(tmp_path / "base")
    enc = tok(["what is 12 plus 3 ? it is 15 .", "what is 12 plus 3 ? no idea ."], padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]  # (2, T) right-padded
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = {}
    for dtype in ("fp32", "bf16"):
        rm, ref = (Scorer(kind, str(tmp_path / folder), tok.pad_token_id, 1.0, DistConfig(frozen_dtype=dtype))
                   for kind, folder in (("reward", "rm"), ("reference", "base")))
        want = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert all(q.dtype == want and not q.requires_grad for s in (rm, ref) for q in s.model.parameters())
        out[dtype] = (rm.score(ids, attn, pos), ref.logp(ids, attn, pos, 4))
    assert ray.is_initialized() == ray_before  # the Scorers did not start Ray
    eps = torch.finfo(torch.bfloat16).eps
    for a, b in zip(out["fp32"], out["bf16"]):
        assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
        torch.testing.assert_close(b, a, rtol=2 * eps, atol=2 * eps)


HEAD = {"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerHostname": "head",
        "Resources": {"CPU": 8.0, "trainer": 2.0, "memory": 1e10, "node:10.0.0.1": 1.0}}
GPUS = {"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.2", "NodeManagerHostname": "gpus",
        "Resources": {"CPU": 8.0, "GPU": 2.0, "sampler": 4.0}}
DEAD = {"NodeID": "c" * 56, "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 64.0, "sampler": 64.0}}


def ray_cfg(*overrides: str):
    from cherrytop.config import load_config
    return load_config("test", [], ["--ray.resources=['policy=trainer', 'value=trainer', 'rollout=sampler']",
                                    "--ray.nodes=['reward=10.0.0.1', 'reference=gpus']", "--ray.rollout_workers=4",
                                    *overrides]).ray


def roles(rc) -> list[str]:
    """The actors of a full fine-tuning run, by role (what `ppo_ray.start_actors` places)."""
    return ["policy", "value", "reward", "reference"] + ["rollout"] * rc.rollout_workers


def test_placement_gives_each_role_its_resource_and_node():
    from cherrytop.stages.ppo_ray import placement
    rc = ray_cfg()
    opts = placement(rc, roles(rc), [HEAD, GPUS, DEAD])
    assert set(opts) == {"policy", "value", "reward", "reference", "rollout"}
    assert opts["policy"]["resources"] == opts["value"]["resources"] == {"trainer": 1.0}
    assert opts["rollout"]["resources"] == {"sampler": 1.0} and "scheduling_strategy" not in opts["rollout"]
    for role, node in (("reward", HEAD), ("reference", GPUS)):  # by IP address and by host name
        s = opts[role]["scheduling_strategy"]
        assert (s.node_id, s.soft) == (node["NodeID"], False) and "resources" not in opts[role]
    assert all(o["num_cpus"] == 1 and o["num_gpus"] == 0.0 for o in opts.values())
    rc = ray_cfg("--ray.resources=[]", "--ray.nodes=[]")
    assert "resources" not in placement(rc, roles(rc), [HEAD])["policy"]


def test_placement_gives_each_role_its_gpus():
    """`ray.gpus` sets a role's GPUs; the others keep `ray.gpus_per_model`; the GPU totals are checked."""
    from cherrytop.stages.ppo_ray import PlacementError, placement
    rc = ray_cfg("--ray.resources=[]", "--ray.nodes=[]", "--ray.gpus_per_model=0.25",
                 "--ray.gpus=['policy=1', 'value=0.5', 'reward=0']")
    gpus = {**GPUS, "Resources": {**GPUS["Resources"], "GPU": 4.0}}
    opts = placement(rc, roles(rc), [HEAD, gpus])
    assert {r: o["num_gpus"] for r, o in opts.items()} == {"policy": 1.0, "value": 0.5, "reward": 0.0,
                                                           "reference": 0.25, "rollout": 0.25}
    # 1 + 0.5 + 0.25 + 4 × 0.25 = 2.75 GPUs: too many for 2, and the message counts the GPU actors only
    with pytest.raises(PlacementError, match=r"\(policy ×1, value ×1, reference ×1, rollout ×4\) need 2.75 GPU in all "
                                             "and the cluster has 2"):
        placement(rc, roles(rc), [HEAD, GPUS])


@pytest.mark.parametrize("overrides,nodes,message", [
    (["--ray.resources=['rollout=gpu_box']"], [HEAD, GPUS], "no node has 'gpu_box'"),
    (["--ray.rollout_workers=5"], [HEAD, GPUS, DEAD], r"rollout ×5\) need 5 sampler in all and the cluster has 4"),
    (["--ray.nodes=['reward=10.0.0.9']"], [HEAD, GPUS], "no alive node of the Ray cluster is '10.0.0.9'"),
    (["--ray.nodes=['reward=10.0.0.3']"], [HEAD, GPUS, DEAD], "no alive node of the Ray cluster is '10.0.0.3'"),
    (["--ray.nodes=['reward=10.0.0.1']"], [HEAD, {**HEAD, "NodeID": "d" * 56}], "2 nodes answer to '10.0.0.1'"),
    (["--ray.gpus_per_model=1", "--ray.resources=[]"], [HEAD, GPUS], "a reward actor needs CPU 1, GPU 1 on node 10.0.0.1"),
    (["--ray.gpus_per_model=1", "--ray.resources=[]", "--ray.nodes=[]"], [HEAD, GPUS], "need 8 GPU in all and the cluster has 2"),
    (["--ray.resources=['policy=trainer', 'value=trainer', 'reward=trainer']"], [HEAD, GPUS],
     r"\(policy ×1, value ×1, reward ×1\) need 3 trainer in all and the cluster has 2"),
    (["--ray.resources=[]", "--ray.nodes=['reward=10.0.0.1', 'reference=head']"], [{**HEAD, "Resources": {"CPU": 1.0}}, GPUS],
     r"\(reward ×1, reference ×1\) need 2 CPU in all and node 10.0.0.1 has 1"),
])
def test_placement_refuses_what_ray_would_wait_for_forever(overrides, nodes, message):
    from cherrytop.stages.ppo_ray import PlacementError, placement
    with pytest.raises(PlacementError, match=message):
        rc = ray_cfg(*overrides)
        placement(rc, roles(rc), nodes)


@pytest.mark.parametrize("override,message", [
    ("--ray.resources=['critic=trainer']", "ray.resources: unknown role 'critic'"),
    ("--ray.nodes=['policy']", "ray.nodes: expected ROLE=VALUE entries, got 'policy'"),
    ("--ray.nodes=['policy=a', 'policy=b']", "ray.nodes: role 'policy' given twice"),
    ("--ray.gpus=['policy=one']", "ray.gpus: expected a number of GPUs ≥ 0 for policy, got 'one'"),
    ("--ray.gpus=['rollout=-1']", "ray.gpus: expected a number of GPUs ≥ 0 for rollout, got '-1'"),
    ("--ray.gpus=['critic=1']", "ray.gpus: unknown role 'critic'"),
])
def test_bad_pinning_settings_are_config_errors(override, message):
    from cherrytop.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config("test", [], [override])


@pytest.mark.slow  # ~40 s on the shared 2 cores (a two-node Ray cluster and five actor processes); run with -m slow
def test_ray_actors_run_where_they_are_pinned(tmp_path, monkeypatch):
    """A two-node Ray cluster on this machine (ray.cluster_utils: a head with 2 units of `trainer`, a
    second node with 2 of `sampler`): the trainers run on the head with a `trainer` unit each, the
    rollout workers on the second node with a `sampler` unit each, the reward model on the node named
    by its id (the head), the reference on the other; with `dist.frozen_dtype=bf16` the frozen models'
    actors hold bf16 weights, the trained ones fp32. A resource the cluster lacks fails at once."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from cherrytop.config import load_config
    from cherrytop.stages.ppo_ray import PlacementError, start_actors
    monkeypatch.setenv("RAY_worker_niceness", "0")
    setup(tmp_path)
    pad = load_tokenizer(tmp_path / "base").pad_token_id
    ray.shutdown()  # a local Ray left by the tests above (ray_session): this test joins its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "resources": {"trainer": 2}})
    second = cluster.add_node(num_cpus=4, resources={"sampler": 2})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        head, other = cluster.head_node.node_id, second.node_id
        cfg = load_config("test", [], ["--ray.resources=['policy=trainer', 'value=trainer', 'rollout=sampler']",
                                       f"--ray.nodes=['reward={head}', 'reference={other}']", "--ray.rollout_workers=2",
                                       "--dist.frozen_dtype=bf16"])
        actors = start_actors(cfg, str(tmp_path / "base"), str(tmp_path / "rm"), pad)
        placed = {name: ray.get(a.where.remote()) for name, a in actors.named().items()}
        assert set(placed) == {"policy", "value", "reward", "reference", "rollout 0", "rollout 1"}
        want = {"policy": (head, {"CPU": 1.0, "trainer": 1.0}), "value": (head, {"CPU": 1.0, "trainer": 1.0}),
                "reward": (head, {"CPU": 1.0}), "reference": (other, {"CPU": 1.0}),
                "rollout 0": (other, {"CPU": 1.0, "sampler": 1.0}), "rollout 1": (other, {"CPU": 1.0, "sampler": 1.0})}
        for name, (node, resources) in want.items():
            assert (placed[name]["node"], placed[name]["resources"]) == (node, resources), name
            frozen = name in ("reward", "reference")
            assert placed[name]["dtypes"] == (["bfloat16"] if frozen else ["float32"]), name
        for a in actors.named().values():
            ray.kill(a)
        bad = load_config("test", [], ["--ray.resources=['rollout=gpu_box']"])
        with pytest.raises(PlacementError, match="no node has 'gpu_box'"):
            start_actors(bad, str(tmp_path / "base"), str(tmp_path / "rm"), pad)
    finally:
        ray.shutdown()
        cluster.shutdown()
