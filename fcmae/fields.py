"""Dataclass fields filled from untyped values (YAML, JSON, command-line flags).

Three things every config of this package needs from its fields, written once:
  `coerce`       a value checked against, and lifted to, the field's type (ConfigError naming the field)
  `check_names`  unknown keys or flags refused with a "did you mean" (difflib), in one line
  `field_docs`   each field's documentation: the comment on its line, so the dataclass reads as its own manual
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Any, Iterable, Sequence

from .errors import ConfigError

__all__ = ["coerce", "check_names", "did_you_mean", "field_docs", "type_name"]


def coerce(key: str, value: Any, hint: Any) -> Any:
    """`value` as the type `hint` (str, int, float, bool, Optional, list[X], tuple[X, ...], tuple[X, Y],
    Literal[...] and a union of these, tried in order: `int | Literal["auto"]`).

    Lifts what YAML and flags give for a typed field: an int for a float, a number for a string, a single value
    for a list or a tuple of one type (a fixed-length tuple gets it in every place: 224 -> (224, 224)), and a
    list for a tuple. Anything else raises ConfigError("{key} must be ..., got ...").
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is typing.Literal:
            if value in args:
                return value
            raise ValueError
        if origin in (typing.Union, types.UnionType) and type(None) not in args:  # Optional is below
            for option in args:
                try:
                    return coerce(key, value, option)
                except ConfigError:
                    continue
            raise ValueError
        if origin in (list, tuple):
            fixed = origin is tuple and Ellipsis not in args
            items = list(value) if isinstance(value, (list, tuple)) else [value] * (len(args) if fixed else 1)
            if fixed and len(items) != len(args):
                raise ValueError
            item_types = args if fixed else [args[0]] * len(items)
            return origin(coerce(key, item, item_type) for item, item_type in zip(items, item_types))
        if type(None) in args:  # Optional[X]
            return None if value is None else coerce(key, value, next(a for a in args if a is not type(None)))
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if hint is int and isinstance(value, str):
            return int(value)
        if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {type_name(hint)}, got {value!r}") from None


def type_name(hint: Any) -> str:
    """'an integer', 'a list of a finite number', 'two integers', ...: how error messages name a type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " or ".join(map(str, args))
    if origin in (typing.Union, types.UnionType) and type(None) not in args:
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple) and Ellipsis not in args and origin is tuple:
        return f"{len(args)} values, each {type_name(args[0])}" if len(set(args)) == 1 else str(hint)
    if origin in (list, tuple):
        return f"a list of {type_name(args[0])}"
    args = tuple(a for a in args if a is not type(None))
    if args:
        return type_name(args[0]) + " or null"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """'did you mean X?' for the valid name closest to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else ""


def check_names(given: Iterable[str], valid: Sequence[str], what: str, source: str) -> None:
    """ConfigError for names in `given` that are not in `valid`, in one line: "did you mean" the closest valid
    name, and where to find the valid ones when nothing is close. `what` is "key" or "flag", `source` where they
    came from."""
    unknown = [name for name in given if name not in valid]
    if not unknown:
        return
    hints = [hint for hint in (did_you_mean(name, valid) for name in unknown) if hint]
    if len(hints) < len(unknown):  # a name close to none: say where the valid ones are
        hints.append("see --help for the flags" if what == "flag" else f"valid {what}s: {', '.join(valid)}")
    raise ConfigError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {source}; "
                      + " ".join(hints))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the comment on its line} for a dataclass and its dataclass bases ('' for none).

    A field documented as `batch_size: int = 64  # images per process` gets "images per process". A subclass
    that redeclares a field (to change its default) keeps the base's comment unless it writes its own.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        for name, doc in _comments(klass).items():
            if doc or name not in docs:
                docs[name] = doc
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _comments(klass: type) -> dict[str, str]:
    """The trailing comment of each annotated assignment in the body of `klass`."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (e.g. built in an interactive session): no docs
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    return {node.target.id: " ".join(comments[line] for line in range(node.lineno, node.end_lineno + 1)
                                      if line in comments)
            for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
