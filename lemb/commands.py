"""How a `lemb` command runs: its options, made from the settings dataclasses; one-line errors; signals.

A setting is declared once, in `pipeline/config.py`. Every scalar setting of a stage's config (and of its
`cluster` section) becomes a flag (`top_k` -> `--top-k`, a boolean `restart` -> `--restart`), typed and documented
from its field; any setting, tables included, can also be given as `--set key=value` (the value read as YAML) or
in `--config FILE`. Flags win over `--set`, which wins over the file. Values are checked by `load_config`, so a bad
one is the same one-line error wherever it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import signal
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from lemb.errors import ConfigError, Interrupted, LembError
from lemb.pipeline.config import GROUPS, IO, load_config

_KW = inspect.Parameter.KEYWORD_ONLY
_SCALARS = (int, float, str, bool)


def _flag_type(hint: Any) -> Any | None:
    """The type a flag parses (Literal choices as str, checked by load_config), or None for a table setting."""
    if typing.get_origin(hint) is typing.Literal:
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and str in args:
        return str  # a setting that is a string or a table: the flag gives the string, --set the table
    return hint if hint in _SCALARS else None


def default_text(f: dataclasses.Field) -> str:
    """A setting's default as --help shows it: `none` for None, `true`/`false`, a table as YAML, zeros included."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value) if value != "" else '""'


def default_note(text: str) -> str:
    """`[default: TEXT]` as typer shows an option's default (dimmed), for defaults typer cannot show itself: a setting
    whose flag defaults to 'not given', or a default that is a rule rather than a value ('all')."""
    return "[dim]\\[default: " + text.replace("[", "\\[") + "][/dim]"


def _describe(f: dataclasses.Field, hint: Any, table: bool) -> str:
    """The help line of a setting's flag: its help, its choices, how a table is given, then `[required]` or its
    default in the style typer gives the defaults of other options (markup: `[` escaped, the default dimmed)."""
    text = f.metadata.get("help", "")
    if typing.get_origin(hint) is typing.Literal:
        text += f" ({' | '.join(typing.get_args(hint))})"
    if table:
        text += " A table, as YAML."
    elif _flag_type(hint) is str and any(typing.get_origin(a) is dict for a in typing.get_args(hint)):
        text += f" A table: --set {f.name}=YAML."
    text = text.replace("[", "\\[")
    if f.metadata.get("required"):
        return text + " [red]\\[required][/red]"
    return text + " " + default_note(default_text(f))


def setting_options(cls: type) -> list[inspect.Parameter]:
    """A keyword parameter with a typer option for each setting of `cls` and of its sections, in its --help panel;
    a table setting's flag takes YAML."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            params += setting_options(hints[f.name])
            continue
        kind = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decls = [flag] if kind is not bool or f.default is False else [f"{flag}/--no-{flag[2:]}"]
        option = typer.Option(
            *decls,
            help=_describe(f, hints[f.name], table=kind is None),
            show_default=False,
            rich_help_panel=f.metadata.get("group"),
            metavar="YAML" if kind is None else None,
        )
        annotation = Annotated[Optional[kind or str], option]
        params.append(inspect.Parameter(f.name, _KW, default=None, annotation=annotation))
    return params


def _tables(cls: type) -> set[str]:
    """The settings of `cls` (and its sections) whose flag takes YAML."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= _tables(hints[f.name])
        elif _flag_type(hints[f.name]) is None:
            out.add(f.name)
    return out


_COMMON = [
    inspect.Parameter("config", _KW, default=None, annotation=Annotated[Optional[Path], typer.Option(
        "--config", help="YAML file of settings (flags and --set win over it).", rich_help_panel=IO)]),
    inspect.Parameter("sets", _KW, default=None, annotation=Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=VALUE (VALUE read as YAML), repeatable: any setting.", rich_help_panel=IO)]),
    inspect.Parameter("quiet", _KW, default=False, annotation=Annotated[bool, typer.Option(
        "--quiet", help="No progress bars. " + default_note("false"), rich_help_panel=IO)]),
]  # fmt: skip


def _panel(param: inspect.Parameter) -> str:
    return typing.get_args(param.annotation)[1].rich_help_panel


def name_value_pairs(items: list[str] | None, flag: str, form: str = "NAME=VALUE") -> dict[str, str]:
    """`NAME=VALUE` items of a repeatable option as a table (`form`: how the message spells an item)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected {form}")
        out[key.strip()] = value
    return out


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items, each VALUE read as YAML."""
    return {k: read_yaml(v, f"--set {k}={v!r}") for k, v in name_value_pairs(items, "--set", "KEY=VALUE").items()}


def read_yaml(value: str, where: str) -> Any:
    """A setting's value given as YAML text (a --set item, a table setting's flag); `where` names it in errors."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None


def stage_command(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `fn(cfg: cls, quiet: bool, **extra)`: the command takes every setting of `cls` as an option, plus
    --config, --set, --quiet and `fn`'s own keyword options, and calls `fn` with the loaded, validated config (its
    parameter annotated `cls`) and `quiet`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = inspect.signature(fn, eval_str=True).parameters.values()
        config_name = next(p.name for p in params if p.annotation is cls)
        extra = [p.replace(kind=_KW) for p in params if p.name not in (config_name, "quiet")]
        names, tables = {p.name for p in extra}, _tables(cls)

        def command(**kwargs: Any) -> Any:
            own = {k: kwargs.pop(k) for k in names}
            path, sets, quiet = kwargs.pop("config"), kwargs.pop("sets"), kwargs.pop("quiet")
            flags = {k: v for k, v in kwargs.items() if v is not None}
            flags.update({k: read_yaml(v, f"--{k.replace('_', '-')} {v!r}") for k, v in flags.items() if k in tables})
            config = load_config(cls, path, **{**parse_sets(sets), **flags})
            return fn(**{config_name: config, "quiet": quiet, **own})

        settings = sorted(setting_options(cls) + _COMMON, key=lambda p: GROUPS.index(_panel(p)))
        command.__signature__ = inspect.Signature(settings + extra)  # type: ignore[attr-defined]
        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        return command

    return wrap


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command whose user mistakes (a LembError: bad input, bad settings, a missing path the user named, a
    conflicting earlier run) print one line and exit 1, and whose SIGINT / SIGTERM stop it cleanly (exit 130 / 143),
    saying how to resume. Any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from lemb.pipeline.executor import quiet_libraries

        quiet_libraries()
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except LembError as exc:  # a user's mistake; anything else (a bug's FileNotFoundError too) keeps its traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            # Ray's blocking calls re-raise a plain KeyboardInterrupt for any signal: the handler noted which
            signum = exc.signum if isinstance(exc, Interrupted) else (_RECEIVED[-1] if _RECEIVED else signal.SIGINT)
            name = signal.Signals(signum).name
            again = "the same command with --resume" if fn.__name__ == "train" else "the same command again"
            typer.echo(f"interrupted ({name}): finished work is kept; run {again} to resume", err=True)
            raise typer.Exit(128 + signum) from None
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


_RECEIVED: list[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise Interrupted(signum)
