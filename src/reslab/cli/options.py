"""The ``reslab`` command line: flags made from type hints and docstrings, in two passes.

A first pass (``parse_known_args``, as timm's ``train.py`` reads ``--config``) takes ``--preset`` and ``--config``,
whose values become the defaults of the second, typed pass: defaults < ``--preset`` < ``--config FILE.yaml`` < flags.
Every option is spelled ``--image-size`` or ``--image_size``; a switch is ``--json``, ``--no-json`` or ``--json
false``. "Given" means on the command line (the second pass without its defaults), one notion for every command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import yaml
from docstring_parser import parse, parse_from_object
from jsonargparse import ActionYesNo, ArgumentParser
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from ..config.schema import PRESETS, SECTIONS, TrainConfig, fields_of
from ..core.errors import ConfigError

# The ranges of the commands' numeric options, as types: the parser refuses a value outside before any work (one line,
# exit 2), and ``--help`` shows them. ``BOUNDS`` words each restriction for the message.
Fraction = restricted_number_type("Fraction", float, [(">", 0), ("<=", 1)])
Port = restricted_number_type("Port", int, [(">=", 0), ("<=", 65535)])
RANGED = (PositiveInt, NonNegativeInt, PositiveFloat, NonNegativeFloat, ClosedUnitInterval, Fraction, Port)
BOUNDS = {"v>0": "must be positive", "v>=0": "must not be negative", "v>=0 and v<=1": "must be in [0, 1]",
          "v>0 and v<=1": "must be in (0, 1]", "v>=0 and v<=65535": "must be 0-65535"}
__all__ = ["ClosedUnitInterval", "Fraction", "NonNegativeFloat", "NonNegativeInt", "Port", "PositiveFloat",
           "PositiveInt"]


def usage_message(exc: Exception) -> str:
    """One line for a parse error: ``--topk must be positive, got 0`` for a value outside its range, else the
    parser's message on one line."""
    text = str(exc)
    key = re.search(r'Parser key "([^"]+)"', text)
    bound = re.search(r"does not conform to restriction (.+?)\s*$", text, re.M)
    value = re.search(r"Given value: (.*)$", text, re.M) or re.search(r"Not of type \w+: (.+?) does not", text)
    word = (re.search(r"(?:invalid literal for int\(\) with base 10|could not convert string to float): '(.*)'", text)
            or re.search(r"Expected a <class '(?:int|float)'>. Got value: (.*)$", text, re.M))
    flag = key and "--" + key.group(1).rsplit(".", 1)[-1].replace("_", "-")
    if flag and bound and value:
        return f"{flag} {BOUNDS.get(bound.group(1), 'must satisfy ' + bound.group(1))}, got {value.group(1)}"
    if flag and word:
        kind = "an integer" if "int" in word.group(0) else "a number"
        return f"{flag} takes {kind}, got {word.group(1)!r}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# Options of ``train`` that are not config fields: how the command runs, not what it trains.
TRAIN_ONLY = ("preset", "config", "resume", "data_changed", "force")


class Param(NamedTuple):
    """One option or positional argument of a command."""

    name: str
    annotation: Any
    default: Any
    help: str


class FirstPass(NamedTuple):
    """What the first pass reads: the preset, the values of the ``--config`` file, and ``--debug``."""

    preset: str | None
    config: dict[str, Any]
    config_file: str | None
    debug: bool


def first_pass(argv: list[str]) -> FirstPass:
    """Read ``--preset``, ``--config`` and ``--debug`` wherever they are, ignoring everything else."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--debug", action="store_true")
    known, _ = p.parse_known_args(argv)
    if known.preset is not None and known.preset not in PRESETS:
        raise ConfigError(f"unknown preset {known.preset!r}; known: {', '.join(PRESETS)}")
    return FirstPass(known.preset, read_config_file(known.config) if known.config else {}, known.config, known.debug)


def read_config_file(path: str) -> dict[str, Any]:
    """The options in a YAML file (e.g. a run's ``config.yaml``), checked against ``TrainConfig``'s fields."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} holds no options (a YAML mapping of option: value)")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"--config {path}: unknown options {', '.join(unknown)}")
    return values


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or annotation == Optional[bool]


def add_params(parser: ArgumentParser, params: list[Param], group: Any = None) -> None:
    """Add ``params`` as flags, except the first when it has no default (``reslab eval MODEL``) and lists without
    a default (``reslab predict MODEL IMAGE...``), which are positional. Other parameters without a default are
    required flags."""
    target = group or parser
    for i, p in enumerate(params):
        flags = dict.fromkeys(["--" + p.name.replace("_", "-"), "--" + p.name])  # --image-size, --image_size
        required = p.default is inspect.Parameter.empty
        many = typing.get_origin(p.annotation) is list
        if required and (i == 0 or many):
            target.add_argument(p.name, nargs="+" if many else None, help=p.help)
        elif _is_bool(p.annotation):
            # --x, --x true, --x=false and --no-x: the parser's own switch, which also reads true/false in YAML.
            target.add_argument(*flags, dest=p.name, nargs="?",
                                action=ActionYesNo(yes_prefix="", no_prefix="no-"), default=p.default, help=p.help)
        else:
            target.add_argument(*flags, dest=p.name, type=p.annotation,
                                **({"required": True} if required else {"default": p.default}), help=p.help)


def wraps(*functions: str, **renamed: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the library functions a command wraps (``"inference.evaluate:evaluate"``): its parameters whose
    default is ``...`` take the library's default, so a default is written once, where the work is done.
    ``renamed``: option name -> the library's name for it (``range_steps="steps"``)."""
    def mark(command: Callable[..., None]) -> Callable[..., None]:
        command.__wraps__, command.__renamed__ = functions, renamed
        return command
    return mark


def library_default(command: Callable[..., Any], name: str) -> Any:
    """The default of ``name`` in the first library function ``command`` wraps that has one, read from its source
    with ``ast`` rather than by importing it (the CLI builds its parsers without loading torch)."""
    name = getattr(command, "__renamed__", {}).get(name, name)
    for target in getattr(command, "__wraps__", ()):
        module, function = target.split(":")
        base = Path(__file__).parents[1] / module.replace(".", "/")
        source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        tree = _parsed(source)
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
        args = node.args.posonlyargs + node.args.args
        defaults = dict(zip([a.arg for a in args[len(args) - len(node.args.defaults):]], node.args.defaults))
        defaults |= {a.arg: d for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None}
        if name in defaults:
            return ast.literal_eval(defaults[name])
    raise TypeError(f"{command.__name__}: no function it wraps has a default for {name!r}")


@functools.cache
def _parsed(source: Path) -> ast.Module:
    return ast.parse(source.read_text())


def function_params(fn: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[Param]:
    """The parameters of a command function, with their types, defaults (``...``: the wrapped library function's)
    and the descriptions of its docstring's Args."""
    hints = typing.get_type_hints(fn)
    docs = {d.arg_name: d.description or "" for d in parse(fn.__doc__ or "").params}
    return [Param(name, hints[name], library_default(fn, name) if p.default is ... else p.default,
                  docs.get(name, "")) for name, p in inspect.signature(fn).parameters.items() if name not in skip]


def config_params() -> Iterator[tuple[str, list[Param]]]:
    """``TrainConfig``'s fields by section: (section title, its options)."""
    hints = typing.get_type_hints(TrainConfig)
    docs = {d.arg_name: d.description or "" for d in parse_from_object(TrainConfig).params}
    for name, section in SECTIONS.items():
        fields = fields_of(name)
        yield section.title, [Param(f.name, hints[f.name], f.default if f.default_factory is dataclasses.MISSING
                                    else f.default_factory(), docs.get(f.name, "")) for f in fields]


def add_config_params(parser: ArgumentParser) -> None:
    """All ``TrainConfig`` options, in one help group per section."""
    for title, params in config_params():
        add_params(parser, params, parser.add_argument_group(title))


def given_options(parser: ArgumentParser, argv: list[str], command: str) -> frozenset[str]:
    """The options of ``command`` that ``argv`` sets explicitly (the parse without defaults)."""
    explicit = parser.parse_args(argv, defaults=False)
    return frozenset(explicit[command].as_dict()) if command in explicit else frozenset()


def takes_config(fn: Callable[..., Any]) -> bool:
    """Whether a command trains from a recipe: its first parameter is ``config: TrainConfig``."""
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    return first is not None and first.name == "config" and typing.get_type_hints(fn)["config"] is TrainConfig


# The recipe commands' first-pass options: read before the parse (they set its defaults), declared for --help.
RECIPE_SOURCES = [
    Param("preset", Optional[str], None, f"start from a preset ({', '.join(PRESETS)}); --config and flags override it"),
    Param("config", Optional[str], None, "a YAML file of options (e.g. a run's config.yaml); flags override it")]


def command_parser(fn: Callable[..., Any], defaults: dict[str, Any] | None = None) -> ArgumentParser:
    """The parser of a command, made from its function: the docstring's description, one option per parameter (the
    docstring's Args as help); a command that takes ``config: TrainConfig`` also gets ``--preset``, ``--config``
    and every recipe option, by section, defaulting to ``defaults``. ``given`` is supplied, never a flag."""
    doc = parse(fn.__doc__ or "")
    description = "\n\n".join(d for d in (doc.short_description, doc.long_description) if d)
    p = ArgumentParser(description=" ".join(description.split()), exit_on_error=False)
    recipe = takes_config(fn)
    own = [q for q in function_params(fn, skip=("config", "given")) if not (recipe and q.name == "preset")]
    add_params(p, (RECIPE_SOURCES if recipe else []) + own)
    if recipe:
        add_config_params(p)
        p.set_defaults(defaults or {})
    return p
