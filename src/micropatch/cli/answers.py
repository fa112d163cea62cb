"""What the agent answered to apply/remove/update, as the lines a command prints.

Standard library only: the full CLI (cli/routing.py) prints these lines with
colours, the quick entry point (cli/quick.py) as plain text, so both say the
same thing.
"""

from __future__ import annotations

TYPE_CHECKING = False  # see cli/quick.py: no typing import on the quick path
if TYPE_CHECKING:
    from typing import Any

GONE = ("ProcessNotFound", "ProcessExited")
SKIPPED = ("NotApplied", "AlreadyApplied", "Downgrade")


class Line:
    __slots__ = ("kind", "text")

    def __init__(self, kind: str, text: str) -> None:
        self.kind = kind  # "ok" | "failed" | "skipped" | "warning" | "summary": style and stream
        self.text = text

    @property
    def to_stderr(self) -> bool:
        return self.kind in ("failed", "skipped", "warning")


class Report:
    __slots__ = ("failed", "lines")

    def __init__(self, lines: list[Line], failed: bool) -> None:
        self.lines = lines
        self.failed = failed


def describe(verb: str, answer: dict[str, Any], *, fleet: bool) -> Report:
    """The lines for one apply/remove/update answered by the agent."""
    lines: list[Line] = []
    if answer.get("verified"):
        lines.append(Line("ok", str(answer["verified"])))
    lines += [Line("warning", str(w)) for w in answer.get("warnings") or []]
    done = 0
    failures = len(answer["unreadable"])
    skipped, gone = answer["skipped"], answer["gone"]
    for pid, fields in answer["unreadable"]:
        lines.append(Line("failed", f"pid {pid}: cannot read its patches: {fields['message']}"))
    for result in answer["results"]:
        pid = result["pid"]
        if "error" in result:
            error = result["error"]
            message = str(error.get("message", ""))
            if fleet and error.get("error") in GONE:
                gone += 1
                lines.append(Line("skipped", f"pid {pid}: gone ({message})"))
            elif fleet and error.get("error") in SKIPPED:
                skipped += 1
                lines.append(Line("skipped", f"pid {pid}: skipped ({message})"))
            else:
                failures += 1
                lines.append(Line("failed", f"pid {pid}: {message}"))
            continue
        o = result["outcome"]
        done += 1
        version = f" v{o['version']}" if o["version"] is not None else ""
        lines.append(Line("ok",
            f"{o['action']} {o['patch_id']}{version} "
            f"({o['sites']} site{'s' if o['sites'] != 1 else ''}) in pid {pid}; "
            f"paused {o['paused'] * 1e3:.2f} ms"
            + (f" after {o['attempts']} attempts" if o["attempts"] > 1 else "")
            + " (through the agent)"
        ))  # fmt: skip
    if not answer["results"] and not fleet:
        lines.append(Line("summary", f"no process to {verb}"))
    if fleet or len(answer["results"]) > 1:
        counts = f"{done} done, {failures} failed, {skipped} skipped, {gone} gone"
        lines.append(Line("summary", f"{verb}: {counts}"))
    return Report(lines, bool(failures))


MARKS = {"ok": "✓ ", "failed": "✗ ", "skipped": "· ", "warning": "warning: ", "summary": ""}


def plain(line: Line) -> str:
    return MARKS[line.kind] + line.text
