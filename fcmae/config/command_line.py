"""The command line of pretrain.py and finetune.py, generated from the config dataclasses.

One flag per setting: each field of the config (`--batch-size`), and each field of its model's config
(FCMAEConfig's `--mask-ratio`, ClassifierConfig's `--drop-path`, with `--model` for the name). The help line of a flag is its field's comment, with the default.
Precedence: dataclass defaults < `--config FILE` < command-line flags.

argparse, generated here, rather than a library: HfArgumentParser reads help from `field(metadata=...)` and
takes neither a nested model config nor a YAML file under the flags; tyro and jsonargparse would add a
dependency and their own flag spellings (`--model.mask-ratio`) and error formats, where users know the flat flags
of the official code and MAE (`--mask_ratio`, `--model`). What this module adds to argparse is small: the
flags from the fields, both spellings (`--data-path`, `--data_path`), and one-line errors with "did you mean".
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from ..errors import ConfigError
from ..fields import check_names, field_docs
from .training_configs import MODEL_SET_BY_RUN, Config, TrainConfig, canonical, from_canonical, merge, model_class
from .yaml_files import load_yaml

__all__ = ["parse_config", "build_parser", "OneLineArgumentParser", "Option", "options", "flag_table"]

EPILOG = """\
Every flag may also be written with underscores (--data_path). A --config file holds the same settings as
YAML keys (data_path: ...), the model's in a model: section (model: {name: atto, mask_ratio: 0.6})."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps help at spaces only: a flag such as --resume or a word such as all-reduce stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser for this package's CLIs: every flag in both spellings (`--data-path`, `--data_path`),
    an unknown flag answered with "did you mean", and every error raised as ConfigError (printed as one
    `error:` line), not usage + error."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        return super().parse_known_args(with_dashes(sys.argv[1:] if args is None else args), namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.reject(unknown)
        return parsed

    def reject(self, unknown: list[str]) -> NoReturn:
        """ConfigError for arguments the parser did not take, with the nearest flag for each unknown one."""
        flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
        if not flags:
            raise ConfigError(f"unexpected argument(s) {' '.join(unknown)}: settings are given as --flag VALUE "
                              "(see --help)")
        valid = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        check_names(flags, valid, "flag", "the command line")
        raise AssertionError("unreachable")  # check_names raised: every name in `flags` is unknown

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def with_dashes(argv: Sequence[str]) -> list[str]:
    """`--data_path=x` -> `--data-path=x`: flag names with dashes, values and anything after `--` untouched."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            out[i] = "--" + name[2:].replace("_", "-") + eq + value
    return out


# Options from the dataclasses -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One command-line flag: the mapping key it sets, its type, default and documentation."""

    key: str
    hint: Any
    default: Any
    doc: str
    model: bool  # one of the model's settings (its FCMAEConfig or ClassifierConfig)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def options(cls: type[TrainConfig]) -> list[Option]:
    """The flags of a config class, in field order: its own fields, and its model's in place of `model`."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "model":
            out += _model_options(model_class(cls))
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out.append(Option(f.name, hints[f.name], default, docs[f.name], model=False))
    return out


def _model_options(model: type) -> list[Option]:
    docs, hints = field_docs(model), typing.get_type_hints(model)
    return [Option("model" if f.name == "name" else f.name, hints[f.name], f.default, docs[f.name], model=True)
            for f in dataclasses.fields(model) if f.name not in MODEL_SET_BY_RUN]


def _default_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def build_parser(cls: type[TrainConfig], description: str = "") -> OneLineArgumentParser:
    """One flag per option. Defaults are None, so that only flags actually given override the config file."""
    parser = OneLineArgumentParser(description=description, epilog=EPILOG, allow_abbrev=False,
                                   formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings; the flags given override it")
    model = parser.add_argument_group(f"model ({model_class(cls).__name__}; in a config file, the model: section)")
    run = parser.add_argument_group("settings")
    for option in options(cls):
        group = model if option.model else run
        help_text = f"{option.doc} (default: {_default_text(option.default)})".replace("%", "%%")
        hint = option.hint
        if hint is bool:
            group.add_argument(option.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
        value_type = args[0] if args else hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) > 1:
            value_type = str  # e.g. an integer or "auto": checked by coerce, which names the field
        nargs = None
        if typing.get_origin(hint) in (list, tuple):
            nargs = "*" if option.key == "log_with" else "+"
        group.add_argument(option.flag, type=value_type, nargs=nargs, default=None, help=help_text,
                           metavar="NAME" if option.key == "model" else option.key.upper())
    return parser


# Parsing --------------------------------------------------------------------------------------------------------


def parse_config(
    cls: type[Config], argv: Sequence[str] | None = None, description: str = "", demo: str | Path | None = None
) -> Config:
    """Build a `cls` config from defaults, an optional `--config FILE`, then command-line flags.

    With `demo`, a command line with no arguments at all runs that config file: a script with no arguments runs its
    demo. Any argument turns that off, and a run without data then fails, saying so (it never replaces the flags
    given with the demo's settings).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if demo is not None and not argv:
        argv = ["--config", str(demo)]
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    file = canonical(cls, load_yaml(args.config), source=args.config) if args.config else {}
    flags = canonical(cls, given, source="the command line")
    config = from_canonical(cls, merge(file, cls.recipe(file, flags), flags))  # each layer made canonical once
    config.explicit = frozenset(given)
    if not config.data_path:
        demo_hint = f"; with no arguments at all it runs the demo ({_shown(demo)})" if demo is not None else ""
        raise ConfigError(f"no data given: pass --data-path FOLDER (or a --config file that sets data_path){demo_hint}")
    return config


def _shown(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# The flag tables of docs/configuration.md ---------------------------------------------------------------------------------------


def flag_table(cls: type[TrainConfig]) -> str:
    """A Markdown table of the flags of `cls`: docs/configuration.md's tables are `python -m fcmae.config`'s output (checked by
    tests/test_cli.py)."""
    rows = ["| flag | default | what it sets |", "| --- | --- | --- |"]
    for option in options(cls):
        flag = f"--[no-]{option.flag[2:]}" if option.hint is bool else option.flag
        rows.append(f"| `{flag}` | {_default_text(option.default)} | {option.doc.replace('|', '/')} |")
    return "\n".join(rows)

