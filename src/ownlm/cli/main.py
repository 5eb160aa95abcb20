"""The `ownlm` command: parse arguments, call the library, print. Errors become one line and an
exit code (2 for bad input, 1 for failures); OWNLM_DEBUG=1 shows the traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from ..errors import OwnlmError
from . import catalog, evaluate, inspect, models, run, serve, tune


class _Parser(argparse.ArgumentParser):
    """A parser whose `intermixed` is set (run's) takes its positionals between and after its
    options, as parse_intermixed_args does: `ownlm run MODEL --temperature 0 why is the sky blue`."""

    intermixed = False
    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if not self.intermixed or self._inside:  # parse_known_intermixed_args calls back here (3.10-3.12)
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}; a prompt starting with a dash goes after `--`")
        return namespace, extras

    def error(self, message: str) -> None:  # one line and exit 2, like every other bad input
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ownlm", description="Own your language model: get it, see it, run it — offline after the pull.")
    p.add_argument("--version", action="version", version=f"ownlm {__import__('ownlm').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    models.register(sub)
    catalog.register(sub)
    run.register(sub)
    serve.register(sub)
    inspect.register(sub)
    evaluate.register(sub)
    tune.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except OwnlmError as e:
        if os.environ.get("OWNLM_DEBUG"):
            traceback.print_exc()
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        if getattr(args, "json", False):  # the same, machine-readable, where the result would have been
            print(json.dumps({"error": e.message, "hint": e.hint, "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if os.environ.get("OWNLM_DEBUG"):
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {e}\nhint: rerun with OWNLM_DEBUG=1 and report it",
              file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": f"unexpected {type(e).__name__}: {e}",
                              "hint": "rerun with OWNLM_DEBUG=1 and report it", "exit_code": 1}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
