"""The generic config loader: YAML file + dotted `a.b=value` overrides -> a typed dataclass tree.

It works for any root dataclass (the training `Config`, aapo-eval's `EvalConfig`): unknown keys get a
did-you-mean drawn from the schema being loaded, values are checked against the field annotations.

    cfg = load(Config, "configs/quickstart_cpu.yaml", ["algorithm.delta_high=0.3"], validate=validate)
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from typing import Any, Callable, Literal, Optional, TypeVar

import yaml

from aapo_megatron.errors import BadInputError

T = TypeVar("T")


class ConfigError(BadInputError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range (exit 2)."""


# --------------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: {field name: doc}."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:]):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def describe(cls: Optional[type] = None, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flattened (dotted key, type, default, doc) for every leaf field of dataclass `cls` (default: Config)."""
    if cls is None:
        from aapo_megatron.config.schema import Config

        cls = Config
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
        else:
            rows.append((key, _type_name(tp), getattr(default, f.name), docs.get(f.name, "")))
    return rows


# --------------------------------------------------------------------------- loading


def load(root: type[T], path: Optional[str] = None, overrides: Optional[list[str]] = None,
         values: Optional[dict[str, Any]] = None, validate: Optional[Callable[[T], Any]] = None) -> T:
    """A `root` dataclass from an optional YAML file, `a.b=value` overrides and `values` (see
    `load_raw_config`), checked against `root`'s schema, then passed to `validate` when given."""
    cfg = from_dict(root, load_raw_config(path, overrides, values))
    if validate is not None:
        validate(cfg)
    return cfg


def load_raw_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                    values: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The nested dict of an optional YAML file, then `a.b=value` overrides (values parsed as YAML), then
    `values` ({dotted key: value}, taken as is). Shared by every config class; `from_dict` types it."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    for key, value in (values or {}).items():
        _set_dotted(raw, key, value)
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`algorithm.delta_high=0.3` -> ("algorithm.delta_high", 0.3); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: Any, prefix: str = "", root: Optional[type] = None) -> T:
    """Construct dataclass `cls` from a nested dict, checking keys and types. `root` is the schema the
    did-you-mean of an unknown key searches (default: `cls` itself)."""
    root = cls if root is None else root
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {type(raw).__name__} ({raw!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + str(key), cls, prefix, root))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, prefix + key + ".", root)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key_message(key: str, cls: type, prefix: str, root: type) -> str:
    moved = getattr(cls, "MOVED_KEYS", {}).get(key[len(prefix):])
    if moved is not None:
        return f"'{key}' has moved: set '{prefix}{moved}' instead"
    local = [prefix + f.name for f in dataclasses.fields(cls)]
    every = _all_keys(root)
    candidates = difflib.get_close_matches(key, local, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, every, n=1, cutoff=0.6
    )
    # A bare leaf name in the wrong section: `delta_high` at top level -> algorithm.delta_high.
    leaf = key.rsplit(".", 1)[-1]
    if not candidates:
        candidates = [k for k in every if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" (did you mean '{candidates[0]}'?)" if candidates else ""
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return f"unknown key '{key}'{hint}; valid keys here: {valid}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; widen int -> float; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"'{key}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}{hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping ({_type_name(tp)}), got {value!r}")
        ktp, vtp = args
        return {_coerce(k, ktp, f"{key}.{k}"): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{key}' must be a string, got {value!r}")
    raise ConfigError(f"'{key}': unsupported annotation {tp!r}")


def dump_yaml(cfg: Any) -> str:
    """YAML text of a config (round-trips through load_config)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
