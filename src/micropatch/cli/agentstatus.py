"""What `micropatch agent status` prints of the agent's snapshot: a table of its
patches (the store's, and those processes carry that the store does not hold), and
notes: pins, exclusions, where each module was found, the new processes, the fleet."""

from __future__ import annotations

from typing import Any

from micropatch.cli.options import out

PATCH_COLUMNS = (
    "patch", "version", "state", "module", "processes", "blocked", "auto-disabled", "copies",
)  # fmt: skip


def show(snapshot: dict[str, Any]) -> None:
    """Print `agent status`: a table on a terminal, else tab-separated rows and `#` notes."""
    rows: list[tuple[str, ...]] = [
        (p["id"], str(p["version"]), p["state"], p["module"], str(p["processes"]),
         str(p["blocked"]), ",".join(a["exe"] for a in p["auto_disabled"]) or "-",
         "-" if p.get("copies") is None else str(len(p["copies"])))
        for p in snapshot["patches"]
    ]  # fmt: skip
    manual_rows, notes = _manual(snapshot.get("manual") or [])
    rows += manual_rows
    notes += _coverage_notes(snapshot)
    exclusions = [
        f"--{e['kind']} {e['pattern']}" + (f" --patch {e['patch_id']}" if e["patch_id"] else "")
        for e in snapshot["exclusions"]
    ]
    covered = len(snapshot["processes"])
    fleet = snapshot.get("fleet")
    if fleet:
        seen = fleet["last_checkin"]
        fleet_line = (
            f"fleet: {fleet['server']} as host {fleet['host_id']} (group {fleet['group']}), "
            + (f"checked in {_ago(seen)}" if seen else "not checked in yet")
            + (f", {fleet['failures']} failed check-ins: {fleet['last_error']}"
               if fleet["failures"] else "")
        )  # fmt: skip
    else:
        fleet_line = None
    summary = (
        f"agent pid {snapshot['pid']}{'' if snapshot['ready'] else ' (starting)'}: "
        f"{len(rows)} patch{'es' if len(rows) != 1 else ''}, {covered} process"
        f"{'es' if covered != 1 else ''} covered, new patches {snapshot['default_state']}"
    )
    if out.is_terminal:
        from rich.markup import escape
        from rich.table import Table

        out.print(escape(summary))
        if rows:
            table = Table(*PATCH_COLUMNS)
            for row in rows:
                table.add_row(*map(escape, row))
            out.print(table)
        for e in exclusions:
            out.print(f"excluded: {escape(e)}")
        for note in notes:
            out.print(escape(note))
        if fleet_line:
            out.print(escape(fleet_line))
        return
    print("\t".join(PATCH_COLUMNS))
    for row in rows:
        print("\t".join(row))
    for e in exclusions:
        print(f"# excluded: {e}")
    for note in notes:
        print(f"# {note}")
    if fleet_line:
        print(f"# {fleet_line}")
    print(f"# {summary}")


def _manual(carried: list[dict[str, Any]]) -> tuple[list[tuple[str, ...]], list[str]]:
    """Patches applied by the operator that the store does not hold: a row per patch
    version (state "manual"), a note per process."""
    by_version: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in carried:
        by_version.setdefault((m["id"], m["version"]), []).append(m)
    rows: list[tuple[str, ...]] = [
        (i, str(v), "manual", ms[0]["module"] or "?", str(len(ms)),
         str(sum(m["blocked"] for m in ms)), "-", "-")
        for (i, v), ms in by_version.items()
    ]  # fmt: skip
    notes = [
        f"manual: {m['id']} v{m['version']} in pid {m['pid']} ({m['exe']}), not in the store: "
        f"new processes do not get it (`micropatch agent add ARTIFACT` to keep them patched)"
        for m in carried
    ]
    return rows, notes


def _coverage_notes(snapshot: dict[str, Any]) -> list[str]:
    """Where each patch's module was found, warnings, and the new-process counts."""
    notes = []
    for p in snapshot["patches"]:
        for pin in p.get("pins") or []:
            pid = pin["pid"]
            notes.append(
                f"pinned: {p['id']} kept in pid {pid} by `micropatch apply`, whatever its "
                f"state (`micropatch remove {p['id']} --pid {pid}` takes it out)"
                if pin["wanted"]
                else f"pinned: {p['id']} kept off pid {pid} by `micropatch remove`, whatever "
                f"its state (`micropatch apply ARTIFACT --pid {pid}` puts it back)"
            )
        if p.get("warning"):
            notes.append(f"warning: {p['id']}: {p['warning']}")
        for path in p.get("copies") or []:
            notes.append(f"copy of {p['id']}: {path}")
    new = snapshot.get("new_processes")
    if new:
        index = new.get("index") or {}
        skipped = ", ".join(f"{s['point']} ({s['fstype']})" for s in index.get("skipped", [])
                            if s["reason"] != "pseudo filesystem")  # fmt: skip
        notes.append(
            f"new processes: {new['patched_exec']} patched at exec, {new['patched_load']} at "
            f"load, {new['late']} late, {new['missed']} missed; index {index.get('state')}: "
            f"{index.get('copies', 0)} copies on {len(index.get('filesystems', []))} filesystems"
            + (f", not indexed: {skipped}" if skipped else "")
        )
    return notes


def _ago(when: float) -> str:
    import time

    return f"{max(0.0, time.time() - when):.0f} s ago"
