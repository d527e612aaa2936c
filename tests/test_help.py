"""`lemb --help` and each command's --help, as a newcomer reads them: commands in the order a run takes them, every
setting of every stage listed (tables included) with its default in one style, required inputs marked, settings
grouped in panels, the sources of `convert` listed."""

import dataclasses
import re
import typing

import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.commands import default_text
from lemb.data.convert import SOURCES
from lemb.pipeline.config import GROUPS, EvalConfig, LabelConfig, RetrieveConfig, TrainConfig

# wide enough that no help line wraps: each option's flag, help and default sit on one line
runner = CliRunner(env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def _fields(cls: type) -> list[dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out += _fields(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else [f]
    return out


def test_commands_are_listed_in_workflow_order():
    text = _help()
    order = ["convert", "retrieve", "label", "train", "eval", "status", "inspect", "rescore", "export", "push", "demo"]
    found = [m.group(1) for m in re.finditer(r"^│ (\w+) ", text, re.M) if m.group(1) in order]
    assert found == order
    assert "lemb retrieve --run runs/a" in text  # the workflow example under the command list


@pytest.mark.parametrize(
    "command, cls",
    [("retrieve", RetrieveConfig), ("label", LabelConfig), ("train", TrainConfig), ("eval", EvalConfig)],
)
def test_every_setting_is_listed_with_its_default(command, cls):
    text = _help(command)
    lines = text.splitlines()
    for f in _fields(cls):
        flag = "--" + f.name.replace("_", "-")
        line = next((ln for ln in lines if re.search(rf"│ +{re.escape(flag)}\b(?!-)", ln)), None)
        assert line is not None, f"{command} --help does not list {flag}"
        wanted = "[required]" if f.metadata.get("required") else f"[default: {default_text(f)}]"
        assert wanted in line, f"{command} --help: {flag} should show {wanted}: {line.strip()}"
        assert f.metadata["help"].split(" (")[0][:40] in line
    # zeros and false are shown like any other default (0 == False once hid them)
    if cls is TrainConfig:
        assert re.search(r"--seed .*\[default: 0\]", text) and re.search(r"--max-grad-norm .*\[default: 0\.0\]", text)
        assert re.search(r"--loss +YAML .*\[default: \{\}\]", text)  # a table setting has a flag taking YAML
    # one style: no '(default X)' left from the earlier help lines
    assert not re.search(r"\(default \w", text)


@pytest.mark.parametrize("command, cls", [("retrieve", RetrieveConfig), ("label", LabelConfig), ("eval", EvalConfig)])
def test_settings_are_grouped_in_panels_in_order(command, cls):
    text = _help(command)
    panels = [m.group(1) for m in re.finditer(r"╭─ (.+?) ─", text)]
    assert panels[0] == "Options" and panels[1] == GROUPS[0]  # typer's own panel first, holding --help alone
    own = text.split("╭─ Options")[1].split("╰")[0]
    assert [m.group(1) for m in re.finditer(r"│ +(--[\w-]+)", own)] == ["--help"]
    shown = panels[1:]
    assert shown == [g for g in GROUPS if g in shown]
    # the run folder and the inputs are in the first panel, the cluster's settings in the last
    first = text.split("╭─ " + GROUPS[0])[1].split("╰")[0]
    assert "--run " in first and "--config " in first
    last = text.split("╭─ " + GROUPS[-1])[1].split("╰")[0]
    assert "--workers " in last and "--executor " in last


def test_a_table_setting_given_as_a_flag_reaches_the_config(tmp_path):
    bad = runner.invoke(app, ["train", "--run", str(tmp_path), "--loss", "{qa: nope}"])
    assert bad.exit_code == 1 and "loss[qa] must be" in bad.output
    broken = runner.invoke(app, ["train", "--run", str(tmp_path), "--task-weights", "{qa: [1"])
    assert broken.exit_code == 1 and "--task-weights '{qa: [1': not valid YAML" in broken.output


def test_convert_help_lists_every_source_with_its_task_kind():
    text = _help("convert")
    for name, source in SOURCES.items():
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{name}")), "")
        assert source.about in line, name
    assert "[default: all]" in text and "--dev-fraction" in text


@pytest.mark.parametrize("command", ["convert", "rescore", "inspect", "export", "push", "status", "demo"])
def test_every_option_of_the_other_commands_shows_a_default_or_is_required(command):
    for line in _help(command).splitlines():
        m = re.match(r"│ +(?:\* +)?(--[\w-]+)", line)
        if m and m.group(1) != "--help":
            assert "[default: " in line or "[required]" in line, line.strip()
