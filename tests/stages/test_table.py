"""The one stage table (`cherrytop.stages.STAGES`): the CLI, the pipeline and the lineage read the same
stages, and both `cherrytop ppo` and `cherrytop pipeline` train PPO on Ray actors with --ray.enabled
(the pipeline used to run single-process PPO then, silently). Ray itself is never started here: the
stage functions are replaced by recorders."""

import pytest

from cherrytop import cli, lineage, pipeline
from cherrytop.config import load_config
from cherrytop.stages import STAGES, ppo, ppo_ray, runner


def _cfg(tmp_path, *extra):
    return load_config("test", [], [f"--run.out_dir={tmp_path}", *extra])


def test_every_reader_has_the_table_s_stages():
    assert list(STAGES) == ["pretrain", "sft", "compare", "rm", "ppo", "ppo_ptx", "dpo"]
    assert [c for c in cli.COMMANDS if c in STAGES] == ["pretrain", "sft", "compare", "rm", "ppo", "dpo"]  # ppo_ptx: none
    assert cli.TRAINING == ("pipeline", "pretrain", "sft", "compare", "rm", "ppo", "dpo")
    assert pipeline.MODELS == ("pretrain", "sft", "ppo", "ppo_ptx", "dpo")
    assert cli._parser().parse_known_args(["pipeline"])[0].until == "dpo"  # --until: any stage, the last by default


@pytest.mark.parametrize("ray", [False, True])
def test_the_table_resolves_ppo_s_runner_from_ray_enabled(tmp_path, ray):
    cfg = _cfg(tmp_path, f"--ray.enabled={str(ray).lower()}")
    want = ppo_ray.run if ray else ppo.run
    for name in ("ppo", "ppo_ptx"):
        fn = runner(name, cfg)
        assert fn.func is want and fn.keywords == {"name": name}  # the module writes runs/<run>/<name>
    from cherrytop.stages import reward, sft
    assert runner("rm", cfg) is reward.run and runner("sft", cfg) is sft.run  # Ray places PPO's models only


def test_the_lineage_reads_each_stage_s_inputs_from_the_table(tmp_path):
    cfg = _cfg(tmp_path, "--rm.train.init=sft", "--ppo.reference=pretrain")
    keys = lambda name: sorted(lineage.inputs(name, cfg))  # noqa: E731
    assert keys("rm") == ["stage:compare", "stage:sft"]
    assert keys("ppo") == ["stage:pretrain", "stage:rm", "stage:sft"]
    assert keys("compare") == ["stage:sft"]
    assert keys("dpo") == ["stage:compare", "stage:sft"]


def test_pipeline_and_cli_train_ppo_on_ray_with_ray_enabled(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ppo_ray, "run", lambda cfg, fresh=False, name="ppo": calls.append(("ray", name)) or {})
    monkeypatch.setattr(ppo, "run", lambda cfg, fresh=False, name="ppo": calls.append(("one process", name)) or {})
    cfg = _cfg(tmp_path, "--ray.enabled=true")
    pipeline._run_stage("ppo", cfg, fresh=False)
    pipeline._run_stage("ppo_ptx", cfg, fresh=False)  # (ppo_ray refuses ptx_coef > 0 itself, as `cherrytop ppo` would)
    assert cli.main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path}", "--ray.enabled=true"]) == 0
    assert cli.main(["ppo", "--preset", "test", f"--run.out_dir={tmp_path}"]) == 0
    assert calls == [("ray", "ppo"), ("ray", "ppo_ptx"), ("ray", "ppo"), ("one process", "ppo")]
