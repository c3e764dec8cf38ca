"""The argument parser of `tandem` and of each of its commands (`TandemParser`).

argparse as it comes takes `--epoch 3` for `--epochs 3` (prefix matching), and
reports a misspelt flag or command with the top-level usage, after it has
complained about a missing required flag. A TandemParser matches flags
exactly and reports a flag or command it does not know first, with its own
usage (`usage: tandem train ...`) and the closest name it knows:

    tandem train: error: unrecognized argument --epoch; did you mean --epochs?
    tandem jobs: error: unknown command 'strat'; did you mean start? (commands: start, list, ...)

Subparsers are TandemParsers too: add_subparsers makes its parsers of the
class of the parser it is called on.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable, Sequence


class TandemParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse `args`, refusing (with this parser's usage) any this parser and its commands
        do not know: the subcommand that meets an unknown argument reports it, not `tandem`."""
        args = list(sys.argv[1:] if args is None else args)
        self._refuse_unknown_names(args)
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:  # stray positional arguments: the unknown flags were refused above
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def _refuse_unknown_names(self, args: list[str]) -> None:
        """Report the first unknown flag, or an unknown command, before argparse checks anything
        else (it would say `--preset` is required before it mentions `--epoch`)."""
        commands = self._commands()
        for arg in args:
            if arg == "--":  # the rest are positional arguments
                return
            if self._is_flag(arg):
                flag = arg.split("=", 1)[0]
                if flag not in self._option_string_actions:
                    self.error(f"unrecognized argument {flag}{suggestion(flag, self._option_string_actions)}")
            elif commands is not None:  # the command; its own parser checks what follows it
                if arg not in commands:
                    known = ", ".join(commands)
                    self.error(f"unknown command {arg!r}{suggestion(arg, commands)} (commands: {known})")
                return

    def _is_flag(self, arg: str) -> bool:
        """Whether argparse takes `arg` for a flag: `-x` or `--x`, but not `-` or a negative number."""
        return arg.startswith("-") and arg != "-" and not self._negative_number_matcher.match(arg)

    def _commands(self) -> dict[str, argparse.ArgumentParser] | None:
        """This parser's commands by name (`tandem jobs`: start, list, ...); None if it has none."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices
        return None


def suggestion(word: str, known: Iterable[str]) -> str:
    """`; did you mean --epochs?` for the known name closest to `word`; "" if none is close."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]}?" if close else ""
