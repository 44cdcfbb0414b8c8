"""The command-line layer every ``gmcnn-mobile`` subcommand is built on: the parser class (one-line usage
errors), the help formatter (defaults shown) and the shared argument types (shapes, comma lists,
thresholds, counts), so that a value is spelled and checked the same way by every command.

The root parser that puts the subcommands together is :mod:`gmcnn_mobile.cli` (the console script),
above every part: a part registers its subcommands with a ``register(subparsers)`` function and never
imports the parts above it (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from .errors import UserError

Shape = Tuple[int, int]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default in --help, except where there is none or the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "(default:" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the tool's error convention: a usage error is one line on stderr, exit 2
    (argparse's own prints the whole usage block first). Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def run(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's ``func(args)``: a UserError is one line on stderr and
    exit 2, Ctrl-C exit 130."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------ argument types
# Each returns the parsed value or raises ArgumentTypeError, which the Parser reports as one line.

def parse_shape(text: str) -> Shape:
    """``"512x680"`` -> (512, 680): rows x columns, both positive integers. UserError otherwise."""
    try:
        rows, cols = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise UserError(f"expected ROWSxCOLS such as 512x680, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise UserError(f"expected ROWSxCOLS with positive sides such as 512x680, got {text!r}")
    return rows, cols


def _argument(parse: Callable) -> Callable:
    """An argparse ``type`` from a parser that raises UserError."""
    def convert(text):
        try:
            return parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def comma_list(text: str) -> List[str]:
    """``"a, b,,c"`` -> ["a", "b", "c"]."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


shape = _argument(parse_shape)


def _shapes(text: str) -> List[Shape]:
    values = [parse_shape(t) for t in comma_list(text)]
    if not values:
        raise UserError(f"expected comma-separated ROWSxCOLS such as 512x680,1024x1360, got {text!r}")
    return values


shape_list = _argument(_shapes)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise UserError(f"must be at least {minimum}, got {value}")
        return value
    parse.__name__ = f"int_at_least_{minimum}"
    return _argument(parse)


def _positive_float(text: str) -> float:
    """A number > 0 (a budget, a size)."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise UserError(f"must be a positive number, got {text!r}")
    return value


positive_float = _argument(_positive_float)


def int_list(minimum: int = 1) -> Callable[[str], List[int]]:
    """Comma-separated integers, each >= ``minimum``."""
    one = int_at_least(minimum)

    def parse(text: str) -> List[int]:
        items = comma_list(text)
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return [one(t) for t in items]
    return parse


def threshold(text: str) -> int:
    """An 8-bit threshold, 1..255."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 255, got {text!r}") from None
    if not 1 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..255")
    return value


def choices_list(choices: Iterable[str], keyword: Optional[str] = None) -> Callable[[str], Optional[List[str]]]:
    """Comma-separated values from ``choices``; ``keyword`` (e.g. ``all``) alone means every one: None."""
    allowed = list(choices)

    def parse(text: str):
        if keyword is not None and str(text).strip() == keyword:
            return None
        values = comma_list(text)
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)}: choose from {', '.join(allowed)}"
                                             + (f" or {keyword}" if keyword else ""))
        return values
    return parse


def keyword_or(keyword: str, parse: Callable) -> Callable:
    """``keyword`` (e.g. ``auto``, ``all``) as itself, anything else through ``parse``."""
    def convert(text):
        return keyword if str(text).strip() == keyword else parse(text)
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert
