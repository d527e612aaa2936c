import dataclasses
import re

import pytest

from lemb.errors import ConfigError
from lemb.pipeline.config import (
    EvalConfig,
    LabelConfig,
    RetrieveConfig,
    TrainConfig,
    config_hash,
    load_config,
    save_config,
)


def test_yaml_and_flags_merge_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("queries: q.jsonl\ntop_k: 3\nshards: 2\n")
    c = load_config(RetrieveConfig, cfg, top_k=5, corpus=None)
    assert (c.queries, c.top_k, c.shards, c.corpus) == ("q.jsonl", 5, 2, None)


def test_all_problems_in_one_message():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, steps=0, lr=-1.0, reward="bogus", loss={"qa": "hinge"})
    msg = str(err.value)
    for part in ("steps must be >= 1", "lr must be > 0", "reward must be", "loss[qa]"):
        assert part in msg


def test_unknown_setting_and_wrong_type():
    with pytest.raises(ConfigError, match="unknown setting 'topk'; n_samples must be int, got 'eight'"):
        load_config(LabelConfig, topk=3, n_samples="eight")


def test_a_retired_setting_names_its_replacement(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("score_batch_size: 32\nn_samples: 4\n")
    with pytest.raises(ConfigError, match="'score_batch_size' was replaced by score_batch_tokens"):
        load_config(LabelConfig, old)
    old.write_text("tensorboard: true\nsteps: 4\n")
    with pytest.raises(ConfigError, match="'tensorboard' was replaced by report_to: pass --report-to tensorboard"):
        load_config(TrainConfig, old)


def test_negative_scoring_budget_is_refused():
    with pytest.raises(ConfigError, match="score_batch_tokens must be >= 0"):
        load_config(LabelConfig, score_batch_tokens=-1)
    assert load_config(LabelConfig, score_batch_tokens=0).score_batch_tokens == 0  # 0: the backend's default


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(LabelConfig, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(LabelConfig, tmp_path / "missing.yaml")


def test_hash_ignores_execution_settings_and_saved_config_round_trips(tmp_path):
    a = load_config(LabelConfig, workers=1, executor="local")
    b = load_config(LabelConfig, workers=4, executor="ray")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(LabelConfig, n_samples=4))
    path = save_config(a, tmp_path)
    assert load_config(LabelConfig, path) == a


def test_training_precision_and_device_are_checked():
    with pytest.raises(ConfigError, match=r"precision must be fp32, bf16 or fp16, got 'fp8'.*device must be auto"):
        load_config(TrainConfig, precision="fp8", device="tpu")
    # the device decides where, not what: a run moved to another device keeps its hash (and its checkpoints)
    assert config_hash(load_config(TrainConfig, device="cpu")) == config_hash(load_config(TrainConfig, device="cuda"))
    assert config_hash(load_config(TrainConfig, precision="bf16")) != config_hash(load_config(TrainConfig))


def test_a_gpu_asked_for_without_one_is_one_clear_error():
    import torch

    from lemb.errors import LembError
    from lemb.trainer.recipe import _device

    assert _device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _device("auto") == torch.device("cpu")
    with pytest.raises(LembError, match="device 'cuda:1' asked for, but torch sees no GPU"):
        _device("cuda:1")


@pytest.mark.parametrize(
    ("cls", "settings", "message"),
    [
        (RetrieveConfig, {"queries": "q.jsonl", "batch_size": -1}, "batch_size must be >= 1, got -1"),
        (RetrieveConfig, {"queries": "q.jsonl", "max_length": 0}, "max_length must be >= 1, got 0"),
        (RetrieveConfig, {"queries": "q.jsonl", "nprobe": 0}, "nprobe must be >= 1"),
        (TrainConfig, {"weight_decay": -1.0}, "weight_decay must be >= 0, got -1.0"),
        (TrainConfig, {"warmup": 1.5}, "warmup must be a fraction of the steps in [0, 1), got 1.5"),
        (TrainConfig, {"save_every": -5}, "save_every must be >= 0"),
        (TrainConfig, {"max_length": 0}, "max_length must be >= 1"),
        (LabelConfig, {"num_gpus": -1.0}, "num_gpus must be >= 0"),
        (LabelConfig, {"dtype": "foo"}, "dtype must be float32, float16 or bfloat16, got 'foo'"),
        (
            RetrieveConfig,
            {"queries": "q.jsonl", "key_template": "{text:d}"},
            "key_template '{text:d}' cannot render a key (Unknown format code 'd'",
        ),
        (
            RetrieveConfig,
            {"queries": "q.jsonl", "key_template": "{title!x} {text}"},
            "key_template '{title!x} {text}' cannot render a key (Unknown conversion specifier x)",
        ),
        (
            EvalConfig,
            {"queries": "q.jsonl", "key_template": {"qa": "{text:>x}"}},
            "key_template[qa] '{text:>x}' cannot",
        ),
    ],
)
def test_settings_that_would_fail_inside_workers_are_refused_before_any_work(cls, settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cls, **settings)


def test_a_config_path_that_is_no_text_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(LabelConfig, tmp_path)
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"n_samples: 4\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8 text \(byte 13\)"):
        load_config(LabelConfig, binary)


def test_settings_of_another_stage_are_refused_naming_where_they_belong():
    with pytest.raises(ConfigError, match=r"unknown setting 'workers' \(a setting of the sharded stages"):
        load_config(TrainConfig, workers=4)
    with pytest.raises(ConfigError, match=r"unknown setting 'shards' \(a setting of retrieve and eval; label's"):
        load_config(LabelConfig, shards=8)


def test_the_cluster_section_reads_flat_or_as_a_table_and_round_trips(tmp_path):
    flat = load_config(LabelConfig, executor="local", workers=2)
    path = tmp_path / "label.yaml"
    path.write_text("cluster: {executor: local, workers: 2}\n")
    assert load_config(LabelConfig, path) == flat
    assert load_config(LabelConfig, save_config(flat, tmp_path / "saved")) == flat
    with pytest.raises(ConfigError, match="executor must be ray or local, got 'slurm'"):
        load_config(LabelConfig, cluster={"executor": "slurm"})
    # where the shards run never changes what they hold
    assert config_hash(flat) == config_hash(load_config(LabelConfig, executor="ray", workers=8))


def test_every_scalar_setting_is_a_flag_and_set_takes_any_setting(tmp_path):
    from typer.testing import CliRunner

    from lemb.cli import app

    runner = CliRunner()
    for command, cls in (("retrieve", RetrieveConfig), ("label", LabelConfig), ("train", TrainConfig)):
        text = runner.invoke(app, [command, "--help"], terminal_width=300).output
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float", "str", "bool") or f.name in ("backend", "reduce", "index", "reward"):
                assert "--" + f.name.replace("_", "-") in text, (command, f.name)
    bad = runner.invoke(app, ["train", "--run", str(tmp_path), "--set", "loss={qa: hinge}"])
    assert bad.exit_code == 1 and "loss[qa] must be graded, kl or contrastive, got 'hinge'" in bad.stderr
    bad = runner.invoke(app, ["train", "--run", str(tmp_path), "--set", "steps"])
    assert bad.exit_code == 1 and "--set 'steps': expected KEY=VALUE" in bad.stderr


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("name", ["lr", "tau", "alpha", "warmup"])
def test_float_settings_must_be_finite(name, value):
    from lemb.commands import parse_sets

    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        load_config(TrainConfig, **parse_sets([f"{name}={value}"]))


def test_label_refuses_a_negative_tie_tolerance_and_a_nan_temperature():
    with pytest.raises(ConfigError, match="tie_tolerance must be >= 0"):
        load_config(LabelConfig, tie_tolerance=-1.0)
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        load_config(LabelConfig, temperature=float("nan"))


def test_whether_a_setting_is_hashed_is_declared_on_its_field():
    """A setting that only says where or how fast a stage runs, or where its input files lie, leaves the config hash
    as it is; every other one changes it. Each field says which it is (`setting(hashed=False)`)."""
    import dataclasses

    from lemb.pipeline.config import UNHASHED, LabelConfig, TrainConfig, config_hash

    base = load_config(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(base, f.name)
        other = {bool: lambda v: not v, int: lambda v: v + 3, float: lambda v: v * 0.5 + 0.25, str: lambda v: v + "x"}
        change = other.get(type(value))
        if change is None or f.name in ("device", "precision", "reward"):  # choices: a changed string is refused
            continue
        moved = dataclasses.replace(base, **{f.name: change(value)})
        assert (config_hash(moved) == config_hash(base)) == (not f.metadata["hashed"]), f.name
    assert {"run", "threads", "save_every", "resume", "report_to"} <= UNHASHED and "lr" not in UNHASHED
    label = load_config(LabelConfig, backend="transformers")
    assert config_hash(dataclasses.replace(label, block_tokens=512)) == config_hash(label)
    assert config_hash(dataclasses.replace(label, n_samples=3)) != config_hash(label)
