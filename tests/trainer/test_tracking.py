"""Experiment trackers of `lemb train --report-to`: wandb (offline) and MLflow (a local file store) get the rows of
log.jsonl and the resolved config; a resumed run continues their runs, a fresh run starts new ones."""

import json
import shutil
import struct
import sys

import pytest

from lemb.errors import MissingDependency
from lemb.pipeline.config import TrainConfig, load_config
from lemb.trainer.recipe import TrainRecipe, train
from lemb.trainer.tracking import TRACKER_IDS, TrainLog, mlflow_name, scalars


def test_scalars_name_the_loss_by_task_and_keep_every_other_number():
    row = {"step": 3, "task": "qa", "loss": 0.5, "lr": 1e-5, "queries": 2, "dev/all/ndcg@10": 0.25, "flag": True}
    assert scalars(row) == {"loss/all": 0.5, "loss/qa": 0.5, "lr": 1e-5, "queries": 2.0, "dev/all/ndcg@10": 0.25}
    assert mlflow_name("dev/all/ndcg@10") == "dev/all/ndcg_at_10"
    assert mlflow_name("dev/qa/recall@1") == "dev/qa/recall_at_1" and mlflow_name("loss/all") == "loss/all"
    assert mlflow_name("a:b#c") == "a_b_c"  # refused on some system: one character each


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_missing_tracker_is_one_line_naming_the_extra(tracker, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, tracker, None)  # as if it were not installed
    with pytest.raises(MissingDependency, match=rf"^{tracker} is not installed; .*pip install 'lemb\[{tracker}\]'$"):
        TrainLog(tmp_path / "log.jsonl", 0, enabled=True, trackers=[tracker], config={"run": str(tmp_path)})
    assert not (tmp_path / "log.jsonl").exists()  # stopped before the log, and so before the first step


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    from lemb.errors import LembError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # the user's explicit refusal of MLflow's file store
    with pytest.raises(LembError, match=r"^--report-to mlflow: cannot start its run \(.*file.*\)$"):
        TrainLog(tmp_path / "log.jsonl", 0, enabled=True, trackers=["mlflow"], config={"run": str(tmp_path)})
    assert not (tmp_path / TRACKER_IDS).exists()


def _wandb_records(path):
    """The records of a .wandb file: a LevelDB log (32 KiB blocks of chunks, each with a 7-byte header: crc32,
    length, type) after a 7-byte W&B header, each record a wandb protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_runs(train_dir):
    """Each offline wandb run under `train_dir`, in the order they ran: its id, its config, its history rows."""
    runs = []
    for folder in sorted((train_dir / "wandb").glob("offline-run-*")):
        config, history, run_id = {}, [], None
        for record in _wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                items = record.history.item
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        runs.append((run_id, config, history))
    return runs


def _mlflow_metric(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_wandb_offline_and_mlflow_file_store_get_the_rows_and_resume(labelled_run, tiny_data, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "WANDB_RESUME", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):  # fmt: skip
        monkeypatch.setenv(name, "")  # restored at teardown, whatever lemb sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, run / stage)
    settings = {"run": str(run), "steps": 4, "batch_size": 2, "group_size": 2, "lr": 5e-5, "save_every": 2,
                "report_to": "wandb,mlflow", "dev": str(tiny_data["queries"]),
                "corpus": str(tiny_data["corpus"])}  # fmt: skip
    # a run that stops after its last step but before its model: its checkpoint (step 2) is resumed
    recipe = TrainRecipe(load_config(TrainConfig, **settings))
    recipe.setup()
    recipe.train(progress=False)
    recipe.cleanup()
    ids = json.loads((run / "train" / TRACKER_IDS).read_text())
    train(load_config(TrainConfig, resume=True, **settings), progress=False)
    assert json.loads((run / "train" / TRACKER_IDS).read_text()) == ids  # the same tracker runs, continued
    rows = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"dev/all/ndcg@10", "dev_seconds"} <= set(rows[1]) and "dev/all/ndcg@10" not in rows[0]

    client = MlflowClient((run / "train" / "mlruns").as_uri())
    assert _mlflow_metric(client, ids["mlflow"], "loss/all") == [(r["step"], r["loss"]) for r in rows]
    assert _mlflow_metric(client, ids["mlflow"], "lr") == [(r["step"], r["lr"]) for r in rows]
    for task in {r["task"] for r in rows}:
        assert _mlflow_metric(client, ids["mlflow"], f"loss/{task}") == [
            (r["step"], r["loss"]) for r in rows if r["task"] == task
        ]
    dev = [(r["step"], r["dev/all/ndcg@10"]) for r in rows if "dev/all/ndcg@10" in r]
    assert _mlflow_metric(client, ids["mlflow"], "dev/all/ndcg_at_10") == dev and [s for s, _ in dev] == [1, 3]
    mlflow_run = client.get_run(ids["mlflow"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    assert mlflow_run.data.params["lr"] == "5e-05" and mlflow_run.data.params["steps"] == "4"
    assert mlflow_run.data.params["keep_metric"] == "all/ndcg@10" and mlflow_run.data.params["loss"] == "{}"

    # wandb offline: the interrupted run's file has every step; the resumed run (same id) logs from its checkpoint
    (first_id, config, first), (resumed_id, _, resumed) = _wandb_runs(run / "train")
    assert first_id == resumed_id == ids["wandb"]
    assert config["lr"] == 5e-5 and config["steps"] == 4 and config["report_to"] == "wandb,mlflow"
    assert [h["_step"] for h in first] == [0, 1, 2, 3] and [h["_step"] for h in resumed] == [2, 3]
    by_step = {h["_step"]: h for h in first} | {h["_step"]: h for h in resumed}
    for r in rows:
        logged = by_step[r["step"]]
        assert logged["loss/all"] == logged[f"loss/{r['task']}"] == r["loss"] and logged["lr"] == r["lr"]
        dev_scores = {k: v for k, v in r.items() if k.startswith("dev/")}
        assert {k: logged[k] for k in dev_scores} == dev_scores

    # a fresh run starts new tracker runs; MLFLOW_TRACKING_URI names the store
    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    train(load_config(TrainConfig, restart=True, **{**settings, "steps": 2, "dev": None}), progress=False)
    fresh = json.loads((run / "train" / TRACKER_IDS).read_text())
    assert fresh["wandb"] != ids["wandb"] and fresh["mlflow"] != ids["mlflow"]
    rows = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert _mlflow_metric(MlflowClient(store), fresh["mlflow"], "loss/all") == [(r["step"], r["loss"]) for r in rows]
    assert _wandb_runs(run / "train")[-1][0] == fresh["wandb"]


@pytest.mark.slow
def test_a_run_that_stops_on_an_error_ends_its_tracker_run_as_failed(labelled_run, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from lemb.errors import LembError

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tmp_path / "run"
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, run / stage)
    with pytest.raises(LembError, match="training diverged"):
        train(load_config(TrainConfig, run=str(run), steps=6, batch_size=2, group_size=2, lr=1e6, warmup=0.0,
                          report_to="mlflow"), progress=False)  # fmt: skip
    run_id = json.loads((run / "train" / TRACKER_IDS).read_text())["mlflow"]
    assert MlflowClient(store).get_run(run_id).info.status == "FAILED"
