"""`micropatch apply`, `remove` and `update`: each declared once, run through the
agent or directly (`transport.py`), printed one way (`report.py`)."""

from __future__ import annotations

from micropatch.cli import say
from micropatch.cli.scope import ALLOW_UNSIGNED, SELECT, TRUST, TUNING, Scope
from micropatch.cli.spec import Argument, Command
from micropatch.errors import MicropatchError, NotApplied

TYPE_CHECKING = False
if TYPE_CHECKING:
    from micropatch.cli.spec import Values

THROUGH_AGENT = (
    "Through the host agent when one runs (docs/agent.md), native and CPython patches "
    "alike; MICROPATCH_NO_AGENT=1 runs directly."
)


def _apply(values: Values) -> None:
    change("apply", values["patch_file"], values)


def _remove(values: Values) -> None:
    change("remove", values["patch_id"], values)


def _update(values: Values) -> None:
    change("update", values["patch_file"], values)


APPLY = Command(
    "apply",
    "Apply a signed patch to running processes: every patchlet, or none.\n\n"
    "--all: every process that maps the patch's module and does not carry the patch yet. "
    + THROUGH_AGENT,
    (Argument("patch_file", "Signed artifact (.mpatch); a TOML source needs --allow-unsigned.",
              kind="path", metavar="PATCH_FILE"),),
    (*SELECT, *TUNING, TRUST, ALLOW_UNSIGNED),
    _apply,
)  # fmt: skip
REMOVE = Command(
    "remove",
    "Remove an applied patch, restoring the original code.\n\n"
    "--all: every process that carries the patch, found without stopping any. " + THROUGH_AGENT,
    (Argument("patch_id", "Id of the applied patch.", metavar="PATCH_ID"),),
    (*SELECT, *TUNING),
    _remove,
)
UPDATE = Command(
    "update",
    "Replace an applied patch by a newer version of it, in one stop of each process.\n\n"
    "--all: every process that carries an older version, found without stopping any. "
    + THROUGH_AGENT,
    (Argument("patch_file", "Signed artifact (.mpatch) of a newer version of an applied patch; "
              "a TOML source needs --allow-unsigned.", kind="path", metavar="PATCH_FILE"),),
    (*SELECT, *TUNING, TRUST, ALLOW_UNSIGNED),
    _update,
)  # fmt: skip
COMMANDS = {c.name: c for c in (APPLY, REMOVE, UPDATE)}


def change(verb: str, subject: str, values: Values) -> None:
    """Run one apply/remove/update (`subject`: the patch file, or the id to remove);
    exits 1 if any process failed."""
    from micropatch.cli import report, transport

    try:
        scope = Scope(values)
    except ValueError as e:
        raise say.fail(str(e)) from None
    direct = bool(values.get("trust") or values.get("allow_unsigned") or scope.dry_run)
    try:
        client = transport.agent(direct=direct)
        if client is not None:
            run = transport.through_agent(client, verb, subject, scope, values)
        else:
            run = transport.directly(verb, subject, scope, values, say.waiting)
    except MicropatchError as e:
        raise say.fail(str(e)) from None

    def hint(pid: int, e: MicropatchError) -> None:
        if verb == "update" and isinstance(e, NotApplied):
            keys = "".join(f" --trust {key}" for key in values.get("trust") or ())
            e.hint(
                "; to patch it for the first time, use "
                f"`micropatch apply {subject} --pid {pid}{keys}`"
            )

    status = report.show(verb, run, selected=scope.filters is not None, hint=hint)
    if status:
        raise SystemExit(status)
