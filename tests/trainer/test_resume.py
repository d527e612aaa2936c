"""kill -9 during `lemb train`, then `--resume`: the final weights equal an uninterrupted run's."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lemb.errors import StageConflict
from lemb.pipeline.config import TrainConfig, load_config
from lemb.trainer.recipe import CHECKPOINT, TrainRecipe, train

SETTINGS = {"steps": 8, "batch_size": 2, "group_size": 2, "lr": 1e-4, "save_every": 2}


def _copy_run(labelled_run, dest):
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, dest / stage)
    return dest


def _train_cmd(run, *extra):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "group_size"]
    return [sys.executable, "-m", "lemb.cli", "train", "--run", str(run), "--quiet", "--threads", "1", *args, *extra]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(labelled_run, tmp_path):
    reference = _copy_run(labelled_run, tmp_path / "reference")
    killed = _copy_run(labelled_run, tmp_path / "killed")
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text("group_size: 2\n")
    subprocess.run(_train_cmd(reference, "--config", str(cfg_file)), check=True, capture_output=True)

    proc = subprocess.Popen(
        _train_cmd(killed, "--config", str(cfg_file)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "train" / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(killed / "train" / CHECKPOINT, weights_only=True)["step"]
    assert 2 <= step < 8 and not (killed / "train" / "model").exists()
    subprocess.run(_train_cmd(killed, "--config", str(cfg_file), "--resume"), check=True, capture_output=True)

    want = load_file(reference / "train" / "model" / "model.safetensors")
    got = load_file(killed / "train" / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    assert not (killed / "train" / CHECKPOINT).exists()
    log = (killed / "train" / "log.jsonl").read_text().splitlines()
    assert len(log) == 8 and log == (reference / "train" / "log.jsonl").read_text().splitlines()


def test_resume_with_changed_settings_refuses(labelled_run, tmp_path):
    run = _copy_run(labelled_run, tmp_path / "run")
    recipe = TrainRecipe(load_config(TrainConfig, run=str(run), **SETTINGS))
    recipe.setup()
    recipe.save_checkpoint(2)
    changed = TrainRecipe(load_config(TrainConfig, run=str(run), resume=True, **{**SETTINGS, "lr": 3e-4}))
    with pytest.raises(StageConflict, match=r"lr: 0.0001 -> 0.0003"):
        changed.setup()
    # the same settings resume from the saved step
    same = TrainRecipe(load_config(TrainConfig, run=str(run), resume=True, **SETTINGS))
    same.setup()
    assert same.start_step == 2
    assert train(load_config(TrainConfig, run=str(run), resume=True, **SETTINGS), progress=False).exists()
