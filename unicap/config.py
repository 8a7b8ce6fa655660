"""The one configuration convention: typed dataclasses, read from YAML, overridden from the command line.

    cfg = config.load(TrainConfig, "train/configs/stage1_cpu.yaml", ["optim.lr=1e-4", "data.micro_batch=4"])
    config.save(cfg, run_dir / "config.yaml")          # the resolved config, as a run records it

Defaults live in the dataclass and nowhere else; a YAML file and `key.sub=value` overrides change them.
Values are checked against the field types (int, float, str, bool, tuples, lists, dicts, Optional,
Literal, nested dataclasses): a wrong type or an unknown key is a `ConfigError` naming the field, never
a silently ignored typo. Override values are parsed as YAML scalars (`1e-4`, `true`, `[1, 2]`).
`add_arguments(parser, cls)` gives a flat dataclass an argparse interface whose defaults come from it.
`check_at_least` and `check_one_of` are the checks a config's `__post_init__` makes (a ValueError naming the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override does not fit its dataclass; the message names the field."""


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(items)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, items, strict=True)))
        item_tp = args[0] if args else Any
        out = [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(kt, k, f"{where} key"): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `name: 10M` stays text, `seed_name: 7` too
        raise ConfigError(f"{where}: expected text, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def check_at_least(low: float, values: dict[str, Any]) -> None:
    """A ValueError naming the first of `values` (field name -> value) that is not >= low."""
    for name, value in values.items():
        if not value >= low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def check_one_of(name: str, value: Any, options: Iterable[Any]) -> None:
    """A ValueError `name value: a, b or c` unless value is one of options."""
    options = list(options)
    if value not in options:
        shown = ", ".join(map(str, options[:-1])) + f" or {options[-1]}" if len(options) > 1 else str(options[0])
        raise ValueError(f"{name} {value!r}: {shown}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping, checking names and types; missing keys keep defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML/JSON-ready data: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """`a.b=value` strings applied to a nested mapping (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: use key=value (e.g. optim.lr=1e-4)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults of `cls` <- YAML file (optional) <- overrides, checked."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides))


def replace(obj: T, overrides: Iterable[str]) -> T:
    """A copy of a config with `key.sub=value` overrides applied and checked."""
    return from_dict(type(obj), apply_overrides(to_dict(obj), overrides))


def save(obj: Any, path: str | Path) -> Path:
    import yaml

    from unicap.atomic import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True))
    return Path(path)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Iterable[str] = ()) -> None:
    """argparse options `--field-name` for a flat dataclass; defaults and types come from the dataclass.

    Booleans become `--x/--no-x`; list/tuple fields take comma-separated values; dict fields take
    `k=v,k=v`; a field without a default is a required option; text fields are taken as typed (never
    parsed as YAML); help text comes from `field(metadata={"help": ...})`."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = _default(f)
        help_ = f.metadata.get("help", "") + ("" if required else f" (default: {_show(default)})")
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        metavar = (
            "{" + ",".join(map(str, typing.get_args(tp))) + "}" if typing.get_origin(tp) is typing.Literal else None
        )

        def convert(text: str, tp=tp, name=f.name):
            origin, args = typing.get_origin(tp), typing.get_args(tp)
            options = args if origin in (typing.Union, types.UnionType) else (tp,)
            value: Any = text
            if any(typing.get_origin(a) in (list, tuple) for a in options):
                value = [v.strip() for v in text.split(",") if v.strip()]
            elif any(typing.get_origin(a) is dict for a in options):
                value = {}
                for item in (kv for kv in text.split(",") if kv.strip()):
                    k, sep, v = item.partition("=")
                    if not sep:
                        raise argparse.ArgumentTypeError(f"{name}: use key=value[,key=value] (got {item!r})")
                    value[k.strip()] = _parse_scalar(v.strip())
            elif text.lower() in ("none", "null") and type(None) in args:
                value = None
            elif str not in options:
                value = _parse_scalar(text)
            try:
                return _coerce(tp, value, name)
            except ConfigError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        parser.add_argument(
            flag, type=convert, default=default, required=required, help=help_, dest=f.name, metavar=metavar
        )


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (None for a field without one: a required option)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(default: Any) -> Any:
    if isinstance(default, tuple | list):
        return ",".join(map(str, default)) or "none"
    if isinstance(default, dict):
        return ",".join(f"{k}={v}" for k, v in default.items()) or "none"
    return default


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass from the options `add_arguments` defined (the same names)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return from_dict(cls, {k: v for k, v in vars(args).items() if k in names})
