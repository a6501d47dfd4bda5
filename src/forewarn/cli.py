"""The `forewarn` command line: the top-level parser and the dispatch to a command.

Each command lives with its group: `cli_replay` (check, replay, backtest, detect: offline, over
recorded data), `cli_outcomes` (report, plan, simulate: measuring what outreach does),
`cli_serve` (serve, migrate, deliver, demo) and `cli_admin` (keys, forget, purge,
dead-letters); what they share is in `cli_args`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from forewarn import cli_admin, cli_outcomes, cli_replay, cli_serve
from forewarn.errors import ForewarnError

# in the order `forewarn --help` lists them
COMMANDS = (
    cli_replay.add_replay,
    cli_replay.add_check,
    cli_serve.add_serve,
    cli_serve.add_migrate,
    cli_admin.add_keys,
    cli_admin.add_forget,
    cli_admin.add_purge,
    cli_admin.add_dead_letters,
    cli_serve.add_deliver,
    cli_replay.add_backtest,
    cli_outcomes.add_report,
    cli_outcomes.add_plan,
    cli_outcomes.add_simulate,
    cli_replay.add_detect,
    cli_serve.add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forewarn",
        description="Proactive support: spot the customer about to hit a problem, reach out first.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        _more(parser, args, rest)
    try:
        code: int = args.run(args)
    except ForewarnError as exc:
        print(f"forewarn {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return code


def _more(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """IDs given after an option (`discard --workspace w 3 4`), which argparse leaves over
    once a list of them has matched nothing before the option: added to the command's list
    (`more`, set by a command that takes one). Anything else left over is refused."""
    into = getattr(args, "more", None)
    if into is None or any(r.startswith("-") for r in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for text in rest:
        if not text.isdigit():
            parser.error(f"argument {into.upper()}: invalid int value: {text!r}")
        getattr(args, into).append(int(text))


if __name__ == "__main__":
    sys.exit(main())
