"""Typed dataclass configs loaded from YAML, with dotted ``key=value`` overrides.

Each field documents itself through ``field(metadata={"help": ...})``; unknown keys are rejected with
the list of valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from kdcache.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Valid:
    """The values a number field accepts, checked when its config is built (``check_fields``), so a bad value
    is reported with its key and the accepted range; ``None`` bounds are open. ``null`` always passes (it
    means "unset" for optional fields)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def accepts(self, v: Any) -> bool:
        if v != v:  # NaN passes every comparison below
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            if self.lo == 0 and self.lo_open:
                return "positive"
            return f"at least {show(self.lo)}" if not self.lo_open else f"greater than {show(self.lo)}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{show(self.lo)}, {show(self.hi)}{right}"


POSITIVE = Valid(0, lo_open=True)
NON_NEGATIVE = Valid(0)
FRACTION = Valid(0, 1)


def at_least(n: float) -> Valid:
    return Valid(n)


def show(value: Any) -> str:
    """A value as the user wrote it in YAML or --set (null, true, 0.5), not as Python prints it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def plural(n: int, word: str) -> str:
    """``1 shard``, ``2 shards``, ``1,234 rows``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


class InvalidValues(ConfigError):
    """Every out-of-range value of one config section, reported together, each with its full key."""

    def __init__(self, problems: list[tuple[str, Any, str]], where: str = ""):
        self.problems = problems
        self.where = where
        prefix = f"{where}." if where else ""
        parts = [f"{prefix}{key} must be {what}, got {show(value)}" for key, value, what in problems]
        first = f"{prefix}{problems[0][0]}"
        super().__init__("; ".join(parts) + f" (fix it in the config file or with --set {first}=...)")

    def under(self, where: str) -> InvalidValues:
        return InvalidValues(self.problems, f"{where}.{self.where}" if self.where else where)


def check_fields(obj: Any) -> None:
    """Check every field that declares ``valid=``; raise :class:`InvalidValues` naming all the bad ones."""
    problems = []
    for f in dataclasses.fields(obj):
        valid = f.metadata.get("valid")
        value = getattr(obj, f.name)
        if valid is None or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(valid.accepts(v) for v in values):
            problems.append((f.name, value, f"{'all ' if isinstance(value, (list, tuple)) else ''}{valid}"))
    if problems:
        raise InvalidValues(problems)


def doc(help: str, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING, valid: Valid | None = None):
    """A dataclass field with its documentation (and optionally its accepted range) attached."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, **({"valid": valid} if valid is not None else {})}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {show(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {show(value)} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {show(value)}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {show(value)}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {show(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {show(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {show(value)}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {show(value)}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build ``cls`` from a mapping, converting types and rejecting unknown keys."""
    hints = get_type_hints(cls)
    data = upgraded(cls, data, where)  # old key names a config still accepts, at every level (idempotent)
    if not where:  # the root call checks every level at once, so all typos are reported together
        reject_unknown_keys(cls, data)
    kwargs = {}
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}  # type: ignore[misc]
    for key, value in data.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]) and key in factories:
            # a section given in part keeps the enclosing config's own defaults for the rest (the demo's
            # train section is not TrainConfig's), not the section class's
            value = _merged(to_dict(factories[key]()), value)
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except InvalidValues as exc:
        raise (exc.under(where) if where else exc) from None
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def upgraded(cls: type, data: dict, where: str = "", warn: bool = True) -> dict:
    """``data`` with the keys a config class renamed moved to their new place, at every level of sections.

    A config class that renamed keys has a ``upgrade_keys(data, where, warn) -> dict`` staticmethod returning a
    new mapping (the caller's is not changed). Sections are upgraded after their enclosing level, so a key
    moved into a section is seen there."""
    hook = getattr(cls, "upgrade_keys", None)
    if hook is not None:
        data = hook(data, where, warn)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    out = None
    for key, value in data.items():
        if key not in names:
            continue
        tp = hints[key]
        new = value
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            new = upgraded(tp, value, f"{prefix}{key}", warn)
        elif isinstance(value, list) and get_origin(tp) is list and dataclasses.is_dataclass(item := (get_args(tp) or (None,))[0]):
            new = [upgraded(item, v, f"{prefix}{key}[{i}]", warn) if isinstance(v, dict) else v for i, v in enumerate(value)]
            new = value if all(a is b for a, b in zip(new, value)) else new
        if new is not value:
            out = dict(data) if out is None else out
            out[key] = new
    return data if out is None else out


@dataclasses.dataclass
class Section:
    """Base of a component's own typed config section (a loss's, a pseudo-teacher's): a dataclass whose
    ``valid=`` ranges are checked when it is built, from a config file or from Python."""

    def __post_init__(self):
        check_fields(self)


def section_config(kind: str, registry: dict[str, type], name: str, section: Any, where: str) -> Any:
    """The section of the registered component ``name`` (a key of ``registry``, whose values are config
    dataclasses) as its dataclass, converted and range-checked; ``where`` is its full key (``losses.jsd``).
    Unknown names and keys are refused with the likely intended one."""
    check_section_names(kind, registry, {name: section}, where.rsplit(".", 1)[0] if "." in where else "")
    cls = registry[name]
    if section is None:
        section = {}
    if isinstance(section, cls):
        return section
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping of that {kind}'s fields, got {show(section)}"
                          + (f" (e.g. --set {where}.{dataclasses.fields(cls)[-1].name}=...)" if dataclasses.fields(cls) else ""))
    reject_unknown_keys(cls, section, where)
    return from_dict(cls, section, where)


def check_section_names(kind: str, registry: dict[str, type], sections: Any, where: str, keys: bool = False) -> None:
    """Every name in ``sections`` (a mapping, the config key ``where``) is in ``registry``; with ``keys`` also
    every key of each section is a field of its config (values are not converted or range-checked)."""
    if not isinstance(sections, dict):
        raise ConfigError(f"{where} must be a mapping of {kind} names to their sections, got {show(sections)}")
    prefix = f"{where}." if where else ""
    for name, section in sections.items():
        if name not in registry:
            close = difflib.get_close_matches(str(name), list(registry), n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            kinds = kind + ("es" if kind.endswith("s") else "s")
            raise ConfigError(f"unknown {kind} {prefix}{name}; {hint}valid {kinds}: {', '.join(sorted(registry))}")
        if keys and isinstance(section, dict):
            reject_unknown_keys(registry[name], section, f"{prefix}{name}")


def reject_unknown_keys(cls: type, data: dict, where: str = "") -> None:
    """One line naming every key of ``data`` (at any depth) that ``cls`` does not have."""
    unknown = unknown_keys(cls, data, where)
    if unknown:
        s = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"unknown config key{s} {'; '.join(unknown)} (`kdcache fields CMD` lists every key)")


def typed_sections(obj: Any) -> None:
    """Sections given as mappings from Python (``TrainConfig(curriculum={...})``, or ``dataclasses.replace``
    with a dict) become their dataclass, checked as a YAML file's would be. Call it in ``__post_init__``."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        if isinstance(value, dict) and dataclasses.is_dataclass(tp):
            reject_unknown_keys(tp, value, f.name)
            setattr(obj, f.name, from_dict(tp, value, f.name))
        elif isinstance(value, list) and get_origin(tp) is list and dataclasses.is_dataclass(item := (get_args(tp) or (None,))[0]):
            typed = []  # a list of sections (train.stages), as a new list: the caller's stays as given
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    reject_unknown_keys(item, v, f"{f.name}[{i}]")
                    v = from_dict(item, v, f"{f.name}[{i}]")
                typed.append(v)
            setattr(obj, f.name, typed)


def unknown_keys(cls: type, data: dict, where: str = "") -> list[str]:
    """Each key of ``data`` (at any depth) that ``cls`` does not have, with the likely intended key."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    out = []
    for key, value in data.items():
        if key in names:
            if isinstance(value, dict) and dataclasses.is_dataclass(hints[key]):
                out.extend(unknown_keys(hints[key], value, f"{prefix}{key}"))
            elif isinstance(value, list) and get_origin(hints[key]) is list and dataclasses.is_dataclass(item := get_args(hints[key])[0]):
                for i, v in enumerate(value):
                    if isinstance(v, dict):
                        out.extend(unknown_keys(item, v, f"{prefix}{key}[{i}]"))
            continue
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        if isinstance(value, dict) and value and all(k in names for k in value):
            # e.g. --set train.steps=3 given to `kdcache train`, whose keys have no train. prefix
            hint = f"drop the {key}. prefix: {', '.join(prefix + k for k in value)}"
        elif close:
            hint = f"did you mean {prefix}{close[0]}?"
        else:
            hint = f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        out.append(f"{prefix}{key} ({hint})")
    return out


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, recursively for nested mappings."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(obj: Any) -> Any:
    """A plain, JSON/YAML-serialisable copy of a config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating levels as needed."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (so ``3``, ``true``, ``[1,2]`` work)."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        example = f"{text.strip()}=VALUE" if text.strip() and "=" not in text else "KEY=VALUE"
        raise ConfigError(f"--set {text!r} must look like key=value: --set {example}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = " ".join(x for x in (exc.context, exc.problem) if x)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {what}; fix the syntax there") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def build_config(
    cls: type[T],
    path: str | Path | None = None,
    values: dict | None = None,
    overrides: list[str] | None = None,
    section: str | None = None,
) -> T:
    """YAML file (optionally one ``section`` of it) < explicit ``values`` < ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        data = load_yaml(path)
        if section is not None:
            data = data.get(section, {}) or {}
    data = json.loads(json.dumps(data))  # deep copy
    for key, value in (values or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return from_dict(cls, data)


def field_docs(cls: type, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every field, for ``--help`` and the README reference. A section's
    defaults are the enclosing config's (the demo's train section), not its class's."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if instance is not None:
            value = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            rows.append((name, "(required)", f.metadata.get("help", "")))
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_docs(hints[f.name], prefix=f"{name}.", instance=value))
            continue
        valid = f.metadata.get("valid")
        rows.append((name, show(value), f.metadata.get("help", "") + (f" Must be {valid}." if valid is not None else "")))
    return rows
