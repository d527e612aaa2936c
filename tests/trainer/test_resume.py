"""kill -9 during `lemb train`, then `--resume`: the final weights equal an uninterrupted run's."""

import json
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
from lemb.trainer.recipe import CHECKPOINT, TIMING_FIELDS, TrainRecipe, train

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
    assert len((killed / "train" / "log.jsonl").read_text().splitlines()) >= step  # written as each step ended
    subprocess.run(_train_cmd(killed, "--config", str(cfg_file), "--resume"), check=True, capture_output=True)

    want = load_file(reference / "train" / "model" / "model.safetensors")
    got = load_file(killed / "train" / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    assert not (killed / "train" / CHECKPOINT).exists()

    def rows(run):  # the log without its timings, which differ between any two runs
        lines = (run / "train" / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]

    assert len(rows(killed)) == 8 and rows(killed) == rows(reference)


@pytest.mark.slow
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


@pytest.mark.slow
def test_train_never_discards_a_run_silently(labelled_run, tmp_path):
    run = _copy_run(labelled_run, tmp_path / "run")
    recipe = TrainRecipe(load_config(TrainConfig, run=str(run), **SETTINGS))
    recipe.setup()
    recipe.save_checkpoint(2)
    checkpoint = run / "train" / CHECKPOINT
    # an unfinished run's checkpoint: a fresh start is refused, naming both ways on
    with pytest.raises(StageConflict, match=r"an unfinished training run is here; pass --resume .* or --restart"):
        train(load_config(TrainConfig, run=str(run), **SETTINGS), progress=False)
    assert checkpoint.exists()
    (run / "train" / ".model.tmp-99999").mkdir()  # left by a run killed while saving its model
    model = train(load_config(TrainConfig, run=str(run), resume=True, **SETTINGS), progress=False)
    assert not checkpoint.exists() and not (run / "train" / ".model.tmp-99999").exists()
    weights = (model / "model.safetensors").stat().st_mtime_ns
    # a finished run: --resume (or the same command again) says so and leaves the model as it is, exit 0
    done = subprocess.run(_train_cmd(run, "--resume", "--config", str(_group_config(tmp_path))), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already trained with these settings" in done.stderr
    assert (model / "model.safetensors").stat().st_mtime_ns == weights
    # other settings on a finished run: refused, naming the change; --restart trains again
    with pytest.raises(StageConflict, match=r"trained with other settings \(lr: 0.0001 -> 0.0003\); pass --restart"):
        train(load_config(TrainConfig, run=str(run), **{**SETTINGS, "lr": 3e-4}), progress=False)
    train(load_config(TrainConfig, run=str(run), restart=True, **{**SETTINGS, "lr": 3e-4}), progress=False)
    assert (model / "model.safetensors").stat().st_mtime_ns != weights


def _group_config(tmp_path):
    path = tmp_path / "group.yaml"
    path.write_text("group_size: 2\n")
    return path


@pytest.mark.parametrize(("steps", "every"), [(3, 1), (8, 2), (100, 25), (1000, 50)])
def test_the_default_checkpoint_interval_gives_a_few_checkpoints_for_any_length(steps, every):
    assert load_config(TrainConfig, steps=steps).checkpoint_every == every
    assert load_config(TrainConfig, steps=steps, save_every=0).checkpoint_every == 0


def test_a_model_whose_saved_settings_this_version_cannot_read_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "train" / "model").mkdir(parents=True)
    (run / "train" / "config.yaml").write_text("executor: local\nshards: 4\nsteps: 3\n")  # an earlier layout
    with pytest.raises(StageConflict, match=r"model: its settings are unknown; pass --restart to train again"):
        train(load_config(TrainConfig, run=str(run), **SETTINGS), progress=False)


def test_a_label_shard_without_a_column_is_refused_in_one_line(labelled_run, tmp_path):
    import pyarrow.parquet as pq

    from lemb.errors import InputError
    from lemb.pipeline.shards import write_shard

    run = _copy_run(labelled_run, tmp_path / "run")
    shard = run / "label" / "part-00001.parquet"
    old = pq.read_table(shard).drop_columns(["pool_size"])  # as an earlier version wrote it
    write_shard(run / "label", 1, old, old.schema, {}, {"rows_out": old.num_rows})
    with pytest.raises(InputError, match=r"part-00001.parquet: file, field 'pool_size': missing column"):
        train(load_config(TrainConfig, run=str(run), **SETTINGS), progress=False)


@pytest.mark.slow
def test_a_diverging_run_fails_in_one_line_and_saves_no_model(labelled_run, tmp_path):
    from typer.testing import CliRunner

    from lemb.cli import app

    run = _copy_run(labelled_run, tmp_path / "run")
    args = ["train", "--run", str(run), "--quiet", "--steps", "6", "--batch-size", "2", "--lr", "1e6",
            "--save-every", "0"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0 and "training diverged" in result.stderr
    assert not (run / "train" / "model").exists()


def test_a_damaged_label_shard_stops_train_in_one_line_and_leaves_nothing(labelled_run, tmp_path):
    from lemb.errors import LembError

    run = _copy_run(labelled_run, tmp_path / "run")
    shard = run / "label" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a full disk or a bad copy
    with pytest.raises(LembError, match=r"part-00000.parquet: damaged: .*rerun `lemb label`"):
        train(load_config(TrainConfig, run=str(run), **SETTINGS), progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["label", "retrieve"]  # no .train.lock, no empty train/


def test_what_a_killed_run_left_is_removed_even_when_the_run_is_already_trained(labelled_run, tmp_path):
    """A run killed right after its model's rename leaves its text file; the next run removes it, although it
    finds the model trained and does nothing else."""
    run = _copy_run(labelled_run, tmp_path / "run")
    settings = {**SETTINGS, "steps": 2}
    train(load_config(TrainConfig, run=str(run), **settings), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [run / "train" / f".texts-{int(dead.stdout)}.arrow", run / "train" / f".model.old-{int(dead.stdout)}"]
    leftovers[0].write_bytes(b"texts of a killed run")
    leftovers[1].mkdir()
    model = run / "train" / "model" / "model.safetensors"
    written = model.stat().st_mtime_ns
    train(load_config(TrainConfig, run=str(run), **settings), progress=False)  # already trained
    assert not any(p.exists() for p in leftovers)
    assert model.stat().st_mtime_ns == written
