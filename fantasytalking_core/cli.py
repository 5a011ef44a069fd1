"""Command line: ``python -m fantasytalking_core {parity,generate} ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import FantasyTalkingError


def _parity(args: argparse.Namespace) -> int:
    from .parity import run_parity

    failed = 0
    for result in run_parity(args.dir):
        print(result.to_json(), flush=True)
        failed += not result.passed
    if failed:
        print(f"parity: {failed} item(s) failed", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fantasytalking_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    parity = sub.add_parser("parity", help="recompute a fixture set of the official implementation and compare")
    parity.add_argument("dir", help="directory laid out like tests/fixtures/official")
    parity.set_defaults(func=_parity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FantasyTalkingError, FileNotFoundError) as exc:
        # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
