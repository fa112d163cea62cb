"""Keeping the module index current: walks when needed, fanotify events between.

One thread owns the index (agent/modindex.py). It walks every watched
filesystem (agent/filesystems.py) at start and when a patch names a build not
looked for before (an agent with no patch never walks); between walks a
fanotify notification group with filesystem marks reports, with the
directory's file handle and the entry's name (`FAN_REPORT_DFID_NAME`), every
file created (`FAN_CREATE`: `cp`, a hard link), renamed into place
(`FAN_MOVED_TO`: a package manager's write-then-rename, a new venv moved in)
or written (`FAN_CLOSE_WRITE`), and every name deleted or renamed away. Each
is looked at where it is now (`open_by_handle_at` on the directory, then the
name in it): there is never a periodic walk of the disk. A directory renamed
into place is walked (what is inside it moved without an event each). Events
are read between walk steps too, so a walk never races them. A full queue
(`FAN_Q_OVERFLOW`: events were lost) costs one walk. Mounts are read again
every 10 s: a new filesystem is marked and walked.

What the index gains or loses goes to `on_change` (NewProcesses marks or
unmarks the files for library loads); the inodes it gains to `on_found` (the
late watch looks for processes that mapped or opened them before; with `True`
when the walk was only for new patches, whose processes were running already).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from micropatch.agent.filesystems import Mount, Skipped, choose, mount_points, read_mounts
from micropatch.agent.modindex import Changes, ModuleIndex, WalkStats, directory_path
from micropatch.errors import FanotifyUnavailable
from micropatch.patch.view import TargetView
from micropatch.process import fanotify

log = logging.getLogger(__name__)

Inode = tuple[int, int]
NOTIFY_FLAGS = fanotify.FAN_CLASS_NOTIF | fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK
NOTIFY_MASK = (
    fanotify.FAN_CREATE | fanotify.FAN_MOVED_TO | fanotify.FAN_CLOSE_WRITE
    | fanotify.FAN_DELETE | fanotify.FAN_MOVED_FROM | fanotify.FAN_ONDIR
)  # fmt: skip
MOUNTS_INTERVAL = 10.0  # seconds between two reads of the mount table
MAX_READS = 64  # reads of the event queue in one go, before the thread looks elsewhere


class Indexer:
    """The thread that keeps a ModuleIndex current (see the module doc)."""

    def __init__(
        self,
        index: ModuleIndex,
        *,
        filesystems: Sequence[str] = (),
        extra_dirs: Sequence[str] = (),
        on_change: Callable[[Changes], None] = lambda _: None,
        on_found: Callable[[set[Inode], bool], None] = lambda _found, _running: None,
        on_mount: Callable[[Mount], None] = lambda _: None,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        """`filesystems`: only those holding these paths (default: every local one);
        `extra_dirs`: directories walked besides (on a filesystem not watched, e.g. a
        network one: found at each walk, not kept current); `on_mount`: a filesystem
        to watch (NewProcesses marks it for execs); `tick`: called in the thread at
        least once a second (NewProcesses looks whether its catalog changed)."""
        self.index = index
        self.only = tuple(filesystems)
        self.extra_dirs = tuple(extra_dirs)
        self.on_change = on_change
        self.on_found = on_found
        self.on_mount = on_mount
        self.tick = tick
        self.ready = threading.Event()  # the first walk with the first targets is done
        self.mounts: list[Mount] = []
        self.skipped: list[Skipped] = []
        self.unfollowed: dict[str, str] = {}  # mount point -> why its events are not read
        self.events_unavailable: str | None = None
        self.last_walk: WalkStats | None = None
        self.walks = 0
        self.events = 0
        self.overflows = 0
        self.walking = False
        self._points: frozenset[str] = frozenset()
        self._fan: fanotify.Fanotify | None = None
        self._mount_fds: dict[int, int] = {}  # fsid -> descriptor of the mount's root
        self._targets: list[TargetView] | None = None
        self._walk_needed = False
        self._walk_why: set[str] = set()  # targets, overflow, mounts: why the next walk
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Mark the filesystems and start the thread (the first walk runs in it)."""
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._fan = fanotify.Fanotify(
                NOTIFY_FLAGS | fanotify.FAN_REPORT_DFID_NAME, os.O_RDONLY | os.O_CLOEXEC
            )
        except FanotifyUnavailable as e:
            self.events_unavailable = str(e)
            log.warning("copies of patched modules made after a walk are not found: %s", e)
        self._read_mounts()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="newproc-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fan is not None:
            self._fan.close()
            self._fan = None
        for fd in (*self._mount_fds.values(), self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._mount_fds.clear()

    def retarget(self, targets: Sequence[TargetView]) -> None:
        """Look for these targets from now on (a walk follows if a build is new)."""
        with self._lock:
            self._targets = list(targets)
        self._wake()

    def status(self) -> dict[str, Any]:
        walk = self.last_walk
        filesystems = [
            {"mount": m.point, "type": m.fstype, "events": m.point not in self.unfollowed,
             "why_not": self.unfollowed.get(m.point)}
            for m in self.mounts
        ]  # fmt: skip
        return {
            "state": "walking" if self.walking else "ready" if self.ready.is_set() else "starting",
            "walks": self.walks,
            "last_walk": asdict(walk) if walk else None,
            "copies": len(self.index.copies()),
            "filesystems": filesystems,
            "skipped": [asdict(s) for s in self.skipped],
            "extra_dirs": list(self.extra_dirs),
            "events": self.events,
            "overflows": self.overflows,
            "events_unavailable": self.events_unavailable,
        }

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # --- mounts -----------------------------------------------------------------------

    def _read_mounts(self) -> list[Mount]:
        """Mark the filesystems not watched yet; returns them."""
        mounts = read_mounts()
        chosen, self.skipped = choose(mounts, self.only)
        self._points = mount_points(mounts)
        known = {m.dev for m in self.mounts}
        new = [m for m in chosen if m.dev not in known]
        for m in new:
            self.mounts.append(m)
            self.on_mount(m)
            self._follow(m)
        return new

    def _follow(self, m: Mount) -> None:
        if self._fan is None:
            self.unfollowed[m.point] = self.events_unavailable or "no fanotify group"
            return
        try:
            self._fan.mark(m.point, NOTIFY_MASK, fanotify.FAN_MARK_FILESYSTEM)
            fd = os.open(m.point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            self.unfollowed[m.point] = f"no file handle events ({e.strerror})"
            log.info("copies made on %s (%s) are found at walks only: %s",
                     m.point, m.fstype, e.strerror)  # fmt: skip
            return
        self._mount_fds[os.statvfs(m.point).f_fsid] = fd

    # --- the thread ---------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self._fan is not None:
            poller.register(self._fan.fd, select.POLLIN)
        next_mounts = time.monotonic() + MOUNTS_INTERVAL
        while not self._stopping.is_set():
            try:
                self.tick()
                self._retarget()
                if self._walk_needed:
                    self._walk_all()
                self.ready.set()
                if time.monotonic() >= next_mounts:
                    next_mounts = time.monotonic() + MOUNTS_INTERVAL
                    if self._read_mounts() and self.index.wanted.targets:
                        self._walk_needed = True
                        self._walk_why.add("mounts")
                        continue
                poller.poll(1000)
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 4096)
                self._drain()
            except Exception:
                log.exception("keeping the module index current failed")
                self._stopping.wait(1.0)

    def _retarget(self) -> None:
        with self._lock:
            targets, self._targets = self._targets, None
        if targets is None:
            return
        new, removed = self.index.set_targets(targets)
        if removed:
            self.on_change(([], removed))
        if new:
            self._walk_needed = True
            self._walk_why.add("targets")

    def _walk_all(self) -> None:
        self._walk_needed = False
        # Copies found only because patches were added (or the agent started): the
        # processes mapping them were running already, not starts the agent missed.
        running, self._walk_why = self._walk_why == {"targets"}, set()
        self.walking = True
        stats = WalkStats()
        found: set[Inode] = set()
        started = time.monotonic()

        def changed(changes: Changes) -> None:
            found.update(c.file.inode for c in changes[0])
            self.on_change(changes)

        roots = [m.point for m in self.mounts] + list(self.extra_dirs)
        complete = True
        try:
            for root in roots:
                skip = self._points - {root}
                if not self.index.walk(root, stats, skip=skip, between=self._between,
                                       on_change=changed):  # fmt: skip
                    complete = False
                    break
            if complete:
                gone = self.index.forget_unseen(started, roots)
                if gone:
                    self.on_change(([], gone))
        finally:
            self.walking = False
            stats.finished = time.time()
            self.last_walk = stats
            self.walks += 1
        log.info(
            "indexed %d files (%d modules, %d hashed) in %.1f s: %d copies of patched modules",
            stats.files, stats.modules, stats.hashed, stats.seconds, len(self.index.copies()),
        )  # fmt: skip
        if found:
            self.on_found(found, running)

    def _between(self) -> bool:
        """Between two walk steps: events read now, so that none waits a whole walk."""
        self._drain()
        with self._lock:
            if self._targets is not None:
                self._walk_needed = True  # looked at after this walk
        return not self._stopping.is_set()

    def _drain(self) -> None:
        fan = self._fan
        if fan is None:
            return
        for _ in range(MAX_READS):
            try:
                events = fan.read(fanotify.FID_READ_SIZE)
            except (OSError, ValueError) as e:
                log.error("reading file events failed: %s", e)
                return
            if not events:
                return
            # One look per (directory, name) of a read: a copy's create, writes and
            # close come together.
            batch: dict[tuple[tuple[int, int], bytes, str], int] = {}
            for event in events:
                if event.overflow:
                    self.overflows += 1
                    self._walk_needed = True
                    self._walk_why.add("overflow")
                    log.warning("file event queue overflow: the index is walked again")
                    continue
                fid = event.fid
                if fid is None or fid.name is None or fid.name == ".":
                    continue
                key = (fid.fsid, fid.handle, fid.name)
                batch[key] = batch.get(key, 0) | event.mask
            self.events += len(batch)
            for (fsid, handle, name), mask in batch.items():
                self._look(fsid, handle, name, mask)

    def _look(self, fsid: tuple[int, int], handle: bytes, name: str, mask: int) -> None:
        mount_fd = self._mount_fds.get((fsid[0] & 0xFFFFFFFF) | ((fsid[1] & 0xFFFFFFFF) << 32))
        if mount_fd is None or not self.index.wanted.targets:
            return
        try:
            dfd = fanotify.open_by_handle(mount_fd, handle)
        except OSError:
            return  # the directory is gone: its entries were reported deleted
        found: set[Inode] = set()
        try:
            directory = directory_path(dfd)
            if directory is None:
                return
            path = directory.rstrip("/") + "/" + name
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                self.on_change(([], self.index.forget(path)))
                return
            except OSError:
                return
            if stat.S_ISREG(st.st_mode):
                changes = self.index.examine(dfd, name, path)
                found.update(c.file.inode for c in changes[0])
                self.on_change(changes)
            elif stat.S_ISDIR(st.st_mode):
                if mask & fanotify.FAN_MOVED_TO:
                    found |= self._walk_moved(path)
            else:
                self.on_change(([], self.index.forget(path)))
        finally:
            os.close(dfd)
        if found:
            self.on_found(found, False)

    def _walk_moved(self, path: str) -> set[Inode]:
        """A directory renamed into place (a venv, an unpacked tree): walk it."""
        stats = WalkStats()
        started = time.monotonic()
        found: set[Inode] = set()

        def changed(changes: Changes) -> None:
            found.update(c.file.inode for c in changes[0])
            self.on_change(changes)

        if self.index.walk(path, stats, skip=self._points - {path}, on_change=changed):
            gone = self.index.forget_unseen(started, [path])
            if gone:
                self.on_change(([], gone))
        return found
