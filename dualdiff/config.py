"""Typed configs: dataclasses <-> YAML, with ``key=value`` command-line overrides.

A config is a (possibly nested) dataclass whose fields carry type annotations. This module
turns YAML mappings and ``key=value`` strings into such dataclasses, converting every value
to the annotated type and refusing anything it does not understand:

* unknown keys raise :class:`ConfigError` naming the key and listing the valid ones
  (with a "did you mean" suggestion);
* a value that does not fit names the key, the expected type and the value it got;
* nested dataclasses are addressed with dots (``train.lr=1e-4``); a ``dict`` field can be
  set whole (``train.optimizer_kwargs={betas: [0.9, 0.99]}``) or key by key
  (``train.optimizer_kwargs.eps=1e-6``).

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``pathlib.Path``, ``Enum``
subclasses, ``Literal[...]``, ``Optional[X]`` / ``X | None`` / unions, ``list[X]``,
``tuple[X, ...]``, ``tuple[X, Y]``, ``dict[K, V]``, nested dataclasses and ``Any``.

Strings are parsed for numeric fields (so ``lr: 1e-4``, which YAML 1.1 reads as a string,
works), ``none``/``null`` gives ``None`` for optional fields, and an integral float
(``1e4``) is accepted for an ``int`` field. A dataclass may define ``validate(self)``; it is
called after loading and after every override (raise ``ValueError`` there).

Typical use in a script (``train_subset.py test_run loss_multiplier_kl=0.0001``)::

    cfg = parse_cli(MyConfig, sys.argv[1:], presets={"test_run": {"train": {"steps": 10}}})
    print(dump_yaml(cfg))
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "from_dict",
    "merge",
    "apply_overrides",
    "load_config",
    "parse_cli",
    "to_dict",
    "dump_yaml",
    "describe",
    "valid_keys",
    "changed_keys",
    "refuse_changes",
]

_NONE_STRINGS = {"none", "null", "~"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


from dualdiff.errors import ConfigError  # noqa: E402  (re-exported here for older imports)


# ---------------------------------------------------------------------------------------
# type helpers


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - unresolvable annotations: fall back to raw
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = _hints(cls)
    return {f.name: (f, hints.get(f.name, Any)) for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys of a config dataclass (nested dataclasses expanded)."""
    out: list[str] = []
    for name, (_, tp) in _fields(cls).items():
        if _is_dataclass_type(tp):
            out.extend(valid_keys(tp, prefix + name + "."))
        else:
            out.append(prefix + name)
    return out


def changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields where the config dataclasses ``a`` and ``b`` differ."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va) and dataclasses.is_dataclass(vb):
            out += changed_keys(va, vb, f"{prefix}{f.name}.")
        elif va != vb:
            out.append(f"{prefix}{f.name}")
    return out


def refuse_changes(stored: Any, cfg: Any, allowed: Sequence[str], what: str) -> None:
    """Raise a ConfigError naming every key where ``cfg`` differs from a finished run's
    ``stored`` config, other than ``allowed`` (dotted keys; ``"section."`` allows a whole
    section). ``what``: why the others cannot change, for the message."""
    bad = [k for k in changed_keys(stored, cfg)
           if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)]
    if bad:
        raise ConfigError(f"{what}: {', '.join(bad)} cannot change (this command reads "
                          f"{', '.join(allowed)})")


def describe(cls: type, prefix: str = "") -> str:
    """One line per key: ``name: type = default``."""
    lines = []
    for name, (f, tp) in _fields(cls).items():
        if _is_dataclass_type(tp):
            lines.append(describe(tp, prefix + name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "<required>"
        lines.append(f"{prefix}{name}: {_type_name(tp)} = {default}")
    return "\n".join(lines)


def _unknown_key(key: str, cls: type, prefix: str) -> ConfigError:
    keys = valid_keys(cls, prefix)
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"unknown config key '{key}' for {cls.__name__}.{hint} Valid keys: {', '.join(keys)}"
    )


def _bad(key: str, tp: Any, value: Any, why: str = "") -> ConfigError:
    extra = f" ({why})" if why else ""
    return ConfigError(
        f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}{extra}"
    )


# ---------------------------------------------------------------------------------------
# value conversion

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _fix_numbers(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: turn such strings into floats."""
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_fix_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _fix_numbers(v) for k, v in value.items()}
    return value


def _convert(value: Any, tp: Any, key: str, from_cli: bool = False) -> Any:
    """Convert ``value`` to annotation ``tp``; ``from_cli``: value is a raw command-line string."""
    if tp is Any or tp is object:
        if from_cli and isinstance(value, str):
            value = yaml.safe_load(value)
        return _fix_numbers(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        nullable = type(None) in args
        if value is None:
            if nullable:
                return None
            raise _bad(key, tp, value)
        if (nullable and isinstance(value, str) and value.strip().lower() in _NONE_STRINGS
                and (from_cli or str not in args)):
            return None
        members = [a for a in args if a is not type(None)]
        # try exact non-string types first so '3' -> int for `int | str`
        members.sort(key=lambda a: a is str)
        for member in members:
            try:
                return _convert(value, member, key, from_cli)
            except ConfigError:
                pass
        raise _bad(key, tp, value)

    if origin is typing.Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if isinstance(value, str) and not isinstance(choice, str) and str(choice) == value:
                return choice
        raise _bad(key, tp, value)

    if value is None:
        raise _bad(key, tp, value, "None is not allowed here; annotate the field Optional")

    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, prefix=key + ".")
        raise _bad(key, tp, value, "set nested keys with dots, e.g. " + f"{key}.<field>=...")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            s = value.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
        raise _bad(key, tp, value)

    if tp is int:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip(), 0)
            except ValueError:
                try:
                    value_f = float(value)
                except ValueError:
                    raise _bad(key, tp, value) from None
                value = value_f
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(key, tp, value)

    if tp is float:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _bad(key, tp, value) from None
        raise _bad(key, tp, value)

    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, tp, value, "quote it in YAML to keep it a string")

    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(value, (str, pathlib.PurePath)):
            return tp(value)
        raise _bad(key, tp, value)

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value == member.value or value == member.name or str(member.value) == str(value):
                return member
        raise _bad(key, tp, value, "choices: " + ", ".join(m.name for m in tp))

    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        seq = value
        if from_cli and isinstance(value, str):
            seq = yaml.safe_load(value) if value.strip() else []
            if isinstance(seq, str) or not isinstance(seq, list):
                seq = [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple)):
            raise _bad(key, tp, value)
        if not args:
            items = list(seq)
        elif origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(seq) != len(args):
                raise _bad(key, tp, value, f"needs exactly {len(args)} items")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(seq, args))]
        else:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(seq)]
        return tuple(items) if (origin is tuple or tp is tuple) else items

    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        mapping = value
        if from_cli and isinstance(value, str):
            mapping = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(mapping, Mapping):
            raise _bad(key, tp, value)
        if not args:
            return dict(mapping)
        kt, vt = args
        return {_convert(k, kt, f"{key}.<key>"): _convert(v, vt, f"{key}.{k}")
                for k, v in mapping.items()}

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _bad(key, tp, value)
    return value  # unknown annotation form: accept as is


# ---------------------------------------------------------------------------------------
# building and layering configs


def _validate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            _validate(v)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid {type(obj).__name__}: {e}") from e


def from_dict(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> Any:
    """Build ``cls`` from a mapping, converting values; unknown keys are errors."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict: {cls!r} is not a dataclass type")
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"config '{prefix.rstrip('.') or cls.__name__}': expected a mapping, "
                          f"got {type(data).__name__}")
    fields = _fields(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise _unknown_key(prefix + str(k), cls, prefix)
        kwargs[k] = _convert(v, fields[k][1], prefix + k)
    missing = [n for n, (f, _) in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing required key(s) "
                          + ", ".join(prefix + m for m in missing))
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid {cls.__name__}: {e}") from e
    return obj


def merge(cfg: Any, data: Mapping[str, Any], prefix: str = "", _validate_after: bool = True) -> Any:
    """Return a copy of ``cfg`` with the (nested) mapping ``data`` layered on top.

    Nested dataclasses merge key by key; every other field is replaced.
    """
    out = copy.deepcopy(cfg)
    _merge_into(out, data, prefix)
    if _validate_after:
        _validate(out)
    return out


def _merge_into(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config '{prefix.rstrip('.') or type(obj).__name__}': expected a "
                          f"mapping, got {type(data).__name__}")
    fields = _fields(type(obj))
    for k, v in data.items():
        if k not in fields:
            raise _unknown_key(prefix + str(k), type(obj), prefix)
        tp = fields[k][1]
        current = getattr(obj, k)
        if _is_dataclass_type(tp) and isinstance(v, Mapping) and dataclasses.is_dataclass(current):
            _merge_into(current, v, prefix + k + ".")
        else:
            setattr(obj, k, _convert(v, tp, prefix + k))


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key, value


def apply_overrides(cfg: Any, overrides: Sequence[str] | Mapping[str, Any]) -> Any:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dotted keys nest).

    ``overrides`` is a list of ``"key=value"`` strings (values converted from the field type)
    or a mapping ``{"train.lr": 1e-4}``.
    """
    out = copy.deepcopy(cfg)
    if isinstance(overrides, Mapping):
        items = [(str(k), v, False) for k, v in overrides.items()]
    else:
        items = [(*_split_override(o), True) for o in overrides]
    for key, value, from_cli in items:
        _set_path(out, key, value, from_cli)
    _validate(out)
    return out


def _set_path(root: Any, key: str, value: Any, from_cli: bool) -> None:
    parts = key.split(".")
    obj = root
    prefix = ""
    for i, part in enumerate(parts):
        fields = _fields(type(obj))
        if part not in fields:
            raise _unknown_key(key, type(root), "") if i == 0 else _unknown_key(
                key, type(obj), prefix)
        tp = fields[part][1]
        last = i == len(parts) - 1
        if last:
            setattr(obj, part, _convert(value, tp, prefix + part, from_cli))
            return
        current = getattr(obj, part)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            obj = current
            prefix += part + "."
            continue
        origin = typing.get_origin(tp)
        if origin in (dict, Mapping, typing.Mapping) or tp is dict or (
                isinstance(current, dict) and tp is Any):
            d = dict(current or {})
            vt = typing.get_args(tp)[1] if typing.get_args(tp) else Any
            _set_in_dict(d, parts[i + 1:], value, vt, prefix + part, from_cli)
            setattr(obj, part, d)
            return
        raise ConfigError(f"config key '{prefix + part}' is a {_type_name(tp)}, "
                          f"it has no sub-key '{'.'.join(parts[i + 1:])}'")


def _set_in_dict(d: dict, parts: list[str], value: Any, vt: Any, prefix: str,
                 from_cli: bool) -> None:
    for p in parts[:-1]:
        prefix += "." + p
        sub = d.get(p)
        if sub is None:
            sub = {}
        elif not isinstance(sub, dict):
            raise ConfigError(f"config key '{prefix}' is not a mapping")
        else:
            sub = dict(sub)
        d[p] = sub
        d = sub
        vt = Any
    d[parts[-1]] = _convert(value, vt, prefix + "." + parts[-1], from_cli)


def _read_yaml(path: str | pathlib.Path) -> Mapping[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping, "
                          f"got {type(data).__name__}")
    return data


def load_config(cls: type, source: str | pathlib.Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> Any:
    """Defaults of ``cls`` <- YAML file or mapping ``source`` <- ``overrides``."""
    data = _read_yaml(source) if isinstance(source, (str, pathlib.PurePath)) else (source or {})
    cfg = from_dict(cls, data)
    _validate(cfg)
    return apply_overrides(cfg, overrides) if overrides else cfg


def parse_cli(cls: type, argv: Sequence[str],
              presets: Mapping[str, Mapping[str, Any] | Any] | None = None) -> Any:
    """Parse ``[preset | file.yaml]... key=value...`` into a ``cls`` config.

    Tokens are applied left to right: a token without ``=`` is a preset name (a mapping or a
    ``cls`` instance in ``presets``) or a YAML file; ``key=value`` tokens are overrides.
    """
    presets = dict(presets or {})
    cfg = from_dict(cls, {})
    for tok in argv:
        if "=" in tok:
            cfg = apply_overrides(cfg, [tok])
        elif tok in presets:
            p = presets[tok]
            cfg = copy.deepcopy(p) if isinstance(p, cls) else merge(cfg, p)
        elif tok.endswith((".yaml", ".yml")) or pathlib.Path(tok).is_file():
            cfg = merge(cfg, _read_yaml(tok))
        else:
            names = ", ".join(sorted(presets)) or "(none)"
            raise ConfigError(f"argument {tok!r} is neither key=value, a preset ({names}) nor a "
                              f"YAML file")
    _validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------
# dumping


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (str/int/float/bool/None/list/dict only): JSON- and YAML-safe."""
    return _plain(cfg)


def dump_yaml(cfg: Any, path: str | pathlib.Path | None = None) -> str:
    """YAML text of ``cfg`` (written to ``path`` too when given); loads back with load_config."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        pathlib.Path(path).write_text(text, encoding="utf-8")
    return text
