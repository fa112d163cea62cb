"""The `micropatch` command: reads the command line and imports only the verb it names.

apply, remove, update and status are read here from their declarations
(`spec.py`) without the CLI framework, so that what such a command costs is
the interpreter, what the verb itself uses, and its work: through the agent,
one round trip; directly, the engine, without the assembler for remove and
status. Anything else — another command, --help, a command line the quick
parser is not sure of — goes to the typer app (`main.py`) made for the command
named, which has the same commands built from the same declarations, and says
what is wrong.
"""

from __future__ import annotations

import os
import sys

# The verbs read here, and the module that declares each (its COMMANDS).
QUICK = {
    "apply": "micropatch.cli.change",
    "remove": "micropatch.cli.change",
    "update": "micropatch.cli.change",
    "status": "micropatch.cli.status",
}
VERBOSE = ("-v", "--verbose")


def verbosity(argv: list[str]) -> tuple[int, list[str]]:
    """The count of leading -v/--verbose/-vv…, and the rest of the command line."""
    count = 0
    for i, word in enumerate(argv):
        if word in VERBOSE:
            count += 1
        elif len(word) > 1 and word.startswith("-") and set(word[1:]) == {"v"}:
            count += len(word) - 1
        else:
            return count, argv[i:]
    return count, []


def configure_logging(verbose: int) -> None:
    """-v: each operation of the engine; -vv: every stop, write, move, retry and rollback."""
    if verbose:
        import logging

        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
        )


def main() -> None:
    verbose, rest = verbosity(sys.argv[1:])
    module = QUICK.get(rest[0]) if rest else None
    if module is not None:
        from micropatch.cli.spec import parse

        __import__(module)
        command = sys.modules[module].COMMANDS[rest[0]]
        values = parse(command, rest[1:])
        if values is not None:
            configure_logging(verbose)
            try:
                command.run(values)
            except KeyboardInterrupt:
                print("\nAborted!", file=sys.stderr)
                sys.exit(1)
            except BrokenPipeError:  # `micropatch status | head`: the reader has gone
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
            sys.exit(0)
    from micropatch.cli.main import app_for

    app_for(rest[0] if rest else None)()
