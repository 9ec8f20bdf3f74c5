"""Options declared once: frozen dataclasses whose field metadata makes the flags, the config and the checks.

Why: every option set used to be written two or three times (a constructor's keyword arguments, an
argparse flag with a copied default, a renaming map, a list of the options that do not change the
numbers), and the copies drifted. Now an option is one dataclass field declared with `opt`:

    batch_size: int = opt(8, "items per micro-batch", low=1)

and everything else is made from it:

- `add_flags(parser, defaults)`: one flag per field (`--batch-size`, or `flag=`), its default the
  value in `defaults` (an instance: a command may start from other defaults, e.g. the server's
  `batch_size=32`), `env=` a variable that overrides the default, `help=` its help; fields with
  `cli=False` (Python objects) get none. `from_args(args, defaults)` builds the instance back.
- `check_fields(self)` (call it from `__post_init__`): strict types from the annotations (a bool is
  not an int, a float must be finite), `low` / `above` bounds, `choices`; messages name the field
  the way `errors.option` does, so the CLI prints the flag.
- `of(cls, keywords, where)`: keyword arguments onto a dataclass; an unknown name raises
  `UnknownOptionError` naming the allowed ones.
- `numbers(instance)`: the fields whose metadata says they change the numbers (`numbers=True`):
  what a resumed job must repeat.
- `like(cls, name, default)`: the same option in another dataclass (one declaration: help, flag,
  checks), with that dataclass's own default.

Adding an option is adding one field. Torch-free, and imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, TypeVar

from q3vl.errors import ConfigError, UnknownOptionError, option

T = TypeVar("T")


def opt(default: Any, help: str, *, flag: str | None = None, env: str | None = None, numbers: bool = False,
        low: float | None = None, above: float | None = None, choices: Sequence[Any] | None = None,
        cli: bool = True, group: str | None = None, metavar: str | None = None,
        parse: Callable[[Any], Any] | None = None, append: bool = False, factory: bool = False,
        required: bool = False) -> Any:
    """A dataclass field with its option metadata (see the module docstring).

    `parse` turns the flag's string (or, with `append`, the list of strings) into the value;
    `factory=True` makes `default` a zero-argument callable (for mutable defaults).
    """
    meta = {"help": help, "flag": flag, "env": env, "numbers": numbers, "low": low, "above": above,
            "choices": tuple(choices) if choices is not None else None, "cli": cli, "group": group,
            "metavar": metavar, "parse": parse, "append": append, "required": required}
    if factory:
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def like(cls: type, name: str, default: Any = MISSING, group: str | None = None) -> Any:
    """Field `name` of option dataclass `cls` re-declared in another one: the same metadata (help, flag,
    checks), with `default` when given (else the original default), shown in `group` when given.
    """
    source = _field(cls, name)
    meta = {**source.metadata, **({"group": group} if group else {})}
    value = source.default if default is MISSING else default
    if value is MISSING and source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=meta)
    return field(default=value, metadata=meta)


def _field(cls: type, name: str) -> Field[Any]:
    for f in fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def option_fields(cls: type) -> list[Field[Any]]:
    """The fields of an option dataclass declared with `opt` (or `like`)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def flag_of(f: Field[Any]) -> str:
    """The command-line flag of a field (`--max-pixels`)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_of(cls: type, name: str) -> Any:
    """The declared default of field `name` of `cls` (a factory is called)."""
    f = _field(cls, name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


# ---------------------------------------------------------------- checks
def check_fields(obj: Any) -> None:
    """Check (and normalise: paths, tuples) every option field of a frozen dataclass instance."""
    hints = typing.get_type_hints(type(obj))
    for f in option_fields(type(obj)):
        value = getattr(obj, f.name)
        fixed = _checked(value, hints[f.name], f)
        if fixed is not value:
            object.__setattr__(obj, f.name, fixed)


def _name(f: Field[Any], value: Any) -> str:
    if not f.metadata.get("cli", True):
        return f.name
    shown = value if isinstance(value, (bool, int, float)) and not isinstance(value, str) else repr(value)
    return option(f"{f.name}={shown}" if len(str(shown)) <= 40 else f"{f.name}=...", flag_of(f))


def _checked(value: Any, hint: Any, f: Field[Any]) -> Any:
    if value is None:
        if _kinds(hint) != (hint,) or hint is Any:
            return None
        raise ConfigError(f"{_name(f, value)} must be given (not None)")
    kinds = _kinds(hint)
    kind = kinds[0] if len(kinds) == 1 else None
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{_name(f, value)} must be True or False, not {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{_name(f, value)} must be an integer, not {type(value).__name__}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ConfigError(f"{_name(f, value)} must be a finite number, not {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{_name(f, value)} must be a string, not {type(value).__name__}")
    if kind is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{_name(f, value)} must be a path, not {type(value).__name__}")
        value = Path(value)
    if isinstance(kind, type) and kind not in (Any, int, float, str, bool, Path) and not isinstance(value, kind):
        raise ConfigError(f"{_name(f, value)} must be a {kind.__name__}, not {type(value).__name__}")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str) or not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{_name(f, value)} must be a list of strings, not {value!r}")
        value = tuple(value)
    _check_bounds(value, f)
    return value


def _check_bounds(value: Any, f: Field[Any]) -> None:
    meta = f.metadata
    low, above, choices = meta.get("low"), meta.get("above"), meta.get("choices")
    if low is not None and isinstance(value, (int, float)) and value < low:
        words = "greater than 0" if low == 1 and isinstance(value, int) else f"at least {low}"
        raise ConfigError(f"{_name(f, value)} must be {words}, not {value}")
    if above is not None and isinstance(value, (int, float)) and not value > above:
        raise ConfigError(f"{_name(f, value)} must be greater than {above}, not {value}")
    if choices is not None and value not in choices:  # the command line's own choices catch a flag's
        raise ConfigError(f"{f.name} must be one of {list(choices)}, not {value!r}")


# ---------------------------------------------------------------- keyword arguments
def of(cls: type[T], keywords: Mapping[str, Any], where: str, base: T | None = None) -> T:
    """`cls` from keyword arguments (on top of `base` when given); unknown names raise, naming the allowed ones."""
    allowed = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise UnknownOptionError(f"{where} got unexpected keyword arguments {unknown}; allowed: {sorted(allowed)}")
    if base is not None:
        return dataclasses.replace(base, **keywords)  # type: ignore[type-var]
    return cls(**keywords)


def split(keywords: Mapping[str, Any], *classes: type) -> list[dict[str, Any]]:
    """`keywords` divided among option dataclasses (each name to the first that has it); the rest last."""
    out: list[dict[str, Any]] = [{} for _ in range(len(classes) + 1)]
    for name, value in keywords.items():
        k = next((i for i, c in enumerate(classes) if any(f.name == name for f in fields(c))), len(classes))
        out[k][name] = value
    return out


def numbers(obj: Any, *, changed_only: bool = False) -> dict[str, Any]:
    """The fields of `obj` that change the numbers (`numbers=True`); with `changed_only`, those that
    differ from their declared default.
    """
    cls = type(obj)
    out = {}
    for f in option_fields(cls):
        if f.metadata.get("numbers"):
            value = getattr(obj, f.name)
            if not changed_only or value != default_of(cls, f.name):
                out[f.name] = value
    return out


# ---------------------------------------------------------------- command-line flags
def add_flags(parser: argparse.ArgumentParser, defaults: Any, only: Iterable[str] | None = None) -> dict[str, Any]:
    """One flag per option field of the dataclass instance `defaults` (only the fields in `only`,
    when given), in argument groups by the fields' `group`, defaulting to its values; returns the
    groups by title.
    """
    names = None if only is None else set(only)
    hints = typing.get_type_hints(type(defaults))
    order = getattr(type(defaults), "FLAG_GROUPS", ())  # the order --help shows the groups in
    groups: dict[str, Any] = {g: parser.add_argument_group(g) for g in order}
    for f in option_fields(type(defaults)):
        meta = f.metadata
        if not meta.get("cli", True) or (names is not None and f.name not in names):
            continue
        group = meta.get("group")
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        _add_flag(target, f, hints[f.name], getattr(defaults, f.name))
    registry = getattr(parser, "q3vl_options", [])
    registry.append((defaults, names))
    parser.q3vl_options = registry  # type: ignore[attr-defined]  # read by the flag-defaults test
    return groups


def _add_flag(target: Any, f: Field[Any], hint: Any, default: Any) -> None:
    meta, flag = f.metadata, flag_of(f)
    env = meta.get("env")
    kinds = _kinds(hint)
    if env and os.environ.get(env):
        default = os.environ[env]
    kw: dict[str, Any] = {"dest": f.name, "help": _help(meta, default, env)}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if meta.get("required"):
        kw["required"] = True
    if kinds == (bool,):  # a switch: --name sets True, --no-name sets False
        target.add_argument(flag, action="store_const", const=not flag.startswith("--no-"), default=default, **kw)
    elif meta.get("append"):
        target.add_argument(flag, action="append", default=None, **kw)
    else:
        if meta.get("choices") is not None:
            kw["choices"] = list(meta["choices"])
        convert = meta.get("parse") or next((k for k in (int, float, Path) if k in kinds), str)
        target.add_argument(flag, type=convert, default=default, **kw)


def _kinds(hint: Any) -> tuple[Any, ...]:
    """The types of a hint, None left out (`int | None` -> (int,))."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(a for a in args if a is not type(None))


def _help(meta: Mapping[str, Any], default: Any, env: str | None) -> str:
    text = str(meta["help"])
    if env:
        text += f" (default: ${env})"
    elif not (default is None or isinstance(default, bool) or default in ((), "", {})) and "default:" not in text:
        text += f" (default: {default})"
    return text.replace("%", "%%")


def from_args(args: argparse.Namespace, defaults: T, only: Iterable[str] | None = None) -> T:
    """A copy of `defaults` with every option flag that `add_flags` added filled in from `args`."""
    names = None if only is None else set(only)
    changes = {}
    for f in option_fields(type(defaults)):
        if not f.metadata.get("cli", True) or (names is not None and f.name not in names) or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("append"):
            value = getattr(defaults, f.name) if value is None else f.metadata["parse"](value)
        changes[f.name] = value
    return dataclasses.replace(defaults, **changes)  # type: ignore[type-var]


__all__ = ["add_flags", "check_fields", "default_of", "flag_of", "from_args", "like", "numbers", "of", "opt",
           "option_fields", "split"]
