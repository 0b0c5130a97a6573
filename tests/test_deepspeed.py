"""DeepSpeed trials inside the Tune sweep, on the CPU (DS_ACCELERATOR=cpu, gloo): each trial fine-tunes
tiny-sdxl as a Ray Train job of two workers, ZeRO-2 or ZeRO-3 by config, reports the same metrics as a
single-process trial, and two such trials run side by side on one node without colliding on ports."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from methods.finetune import FinetuneConfig, deepspeed_config
from tests.conftest import REPO
from tests.test_e2e import resurgence_cmd

SINGLE_PROCESS_METRICS = {
    "presence",
    "resurgence",
    "retention",
    "ft_loss",
    "ft_distance",
    "ft_step",
    "presence_base",
    "presence_erased",
    "retention_erased",
    "erase_distance",
    "data_closeness",
    "trial_seconds",
}


def ds_spec(stage: int) -> dict:
    return {
        "name": f"deepspeed-zero{stage}",
        "model": {"name": "tiny-sdxl", "config": {"seed": 0}},
        "concept": {"name": "circle", "prompts": ["a circle"]},
        "others": [{"name": "square", "prompts": ["a square"]}],
        "erase": {"method": "uce"},
        "finetune": {
            "dataset": {"name": "generated", "config": {"prompts": ["a square"], "images_per_prompt": 4, "steps": 2}},
            "config": {"trainable": "full", "steps": 4, "batch_size": 2, "lr": 1e-4},
            "eval_every": 2,
        },
        "evaluate": {
            "detector": {"name": "clip", "config": {"model": "tiny-test", "pretrained": None}},
            "config": {"images_per_prompt": 1, "steps": 2},
        },
        "search": {
            "num_samples": 2,
            "max_concurrent_trials": 2,
            "space": {"finetune.config.lr": {"choice": [1e-4, 3e-4]}},
        },
        "resources": {"cpu": 1},
        "distributed": {
            "workers": 2,
            "deepspeed": str(REPO / "cluster/deepspeed/zero2.json")
            if stage == 2
            else {"zero_optimization": {"stage": 3}},
        },
    }


def test_deepspeed_config_takes_the_searched_settings():
    base = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "_comment": "x"}
    import torch

    cfg = deepspeed_config(base, FinetuneConfig(lr=3e-4, batch_size=8, optimizer="adamw"), 4, torch.device("cpu"))
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 3e-4
    assert cfg["bf16"]["enabled"] is False and "_comment" not in cfg  # no bf16 on the CPU
    sgd = deepspeed_config(base, FinetuneConfig(optimizer="sgd", batch_size=4), 2, torch.device("cpu"))
    assert "optimizer" not in sgd  # SGD runs as a torch optimizer handed to the engine
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config(base, FinetuneConfig(batch_size=3), 2, torch.device("cpu"))


@pytest.mark.slow  # about 3 minutes each on 2 cores: run by .ci/run with -m slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_deepspeed_trials_side_by_side_report_like_single_process_ones(tmp_path, isolated_env, stage):
    import subprocess

    spec = tmp_path / "ds.yaml"
    spec.write_text(yaml.safe_dump(ds_spec(stage)))
    env = {**isolated_env, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        # 2 trials x (2 workers x 1 CPU + the trial's own 0.25): logical CPUs, on 2 cores
        [*resurgence_cmd(), "run", str(spec), "--num-cpus", "5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "Address already in use" not in log and "EADDRINUSE" not in log
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"deepspeed-zero{stage}")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'trial'")
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert SINGLE_PROCESS_METRICS <= set(run.data.metrics), SINGLE_PROCESS_METRICS - set(run.data.metrics)
        assert run.data.params["distributed.workers"] == "2"
        assert run.data.params["distributed.deepspeed.zero_optimization.stage"] == str(stage)
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "resurgence"))
        assert steps == [0, 2, 4]
        assert run.data.metrics["ft_distance"] > 0  # the engine did move the weights rank 0 evaluates
    a, b = sorted(runs, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time  # the two trials ran at the same time on this node
