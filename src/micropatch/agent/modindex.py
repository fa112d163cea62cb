"""The module index: every file on the watched filesystems that is a patched module
build, found by identity, whatever its name or directory.

A patch names one module build (build-id, SHA-256). Wheels vendor libraries in
`site-packages/*.libs` under renamed files, builds load them through rpath and
`$ORIGIN`, `/opt` and conda trees carry their own copies: the index finds every
copy by what it is, not where it is. What it costs, per file:

1. the directory entry's type (no system call): only regular files go on;
2. open (O_NOATIME) and one read of the first page: the ELF magic, the program
   headers and the GNU build-id note (`elf.identity.peek`); nothing else is read
   of a file that is not an x86-64 module, or whose build-id no watched patch
   names;
3. a candidate (its build-id is a patch's) is hashed (SHA-256, through the
   shared `FileCache`: once per file version) and kept if its identity is a
   target's. A module without a build-id is a candidate only under its target's
   file name (the artifact has no cheaper key: see docs/agent.md, "Index").

Only matches are kept in memory, so the index of a host costs the walk's stack,
not its file count. `walk` is called at start and when a patch names a build
not looked for before; between walks the index is kept current one path at a
time (`examine`, `forget`), from fanotify's create/rename/write events
(agent/indexer.py). Not thread-safe for writers: one thread (the indexer)
changes it; `get`, `copies` and `paths_of` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from micropatch.agent.files import FileCache, ModuleFile
from micropatch.elf.header import ELF_MAGIC
from micropatch.elf.identity import peek
from micropatch.patch.view import TargetView

log = logging.getLogger(__name__)

Inode = tuple[int, int]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
BETWEEN_EVERY = 512  # entries walked between two calls of `between` (events, stop)


@dataclass(frozen=True)
class Wanted:
    """What the index looks for: the targets of the enabled patches, by build-id
    (lowercase hex), and by file name for those without one."""

    targets: tuple[TargetView, ...] = ()
    by_build_id: dict[str, tuple[TargetView, ...]] = field(default_factory=dict)
    by_name: dict[str, tuple[TargetView, ...]] = field(default_factory=dict)

    @classmethod
    def of(cls, targets: Iterable[TargetView]) -> Wanted:
        by_build_id: dict[str, list[TargetView]] = {}
        by_name: dict[str, list[TargetView]] = {}
        kept = []
        for t in targets:
            if not t.build_id and not t.sha256:
                continue  # pins nothing: matches nothing
            kept.append(t)
            if t.build_id:
                by_build_id.setdefault(t.build_id.lower(), []).append(t)
            else:
                by_name.setdefault(t.module, []).append(t)
        return cls(
            tuple(kept),
            {k: tuple(v) for k, v in by_build_id.items()},
            {k: tuple(v) for k, v in by_name.items()},
        )

    def keys(self) -> frozenset[tuple[str, str]]:
        """What a walk looks for: a new key needs a new walk, a key gone does not."""
        return frozenset(
            {("build-id", k) for k in self.by_build_id}
            | {(t.module, t.sha256 or "") for ts in self.by_name.values() for t in ts}
        )

    def candidates(self, build_id: str | None, name: str) -> tuple[TargetView, ...]:
        found = self.by_build_id.get(build_id, ()) if build_id is not None else ()
        return found + self.by_name.get(name, ())


@dataclass
class Copy:
    """One file (inode) that is a watched target's module build, and its names."""

    file: ModuleFile
    targets: tuple[TargetView, ...]
    paths: set[str] = field(default_factory=set)


@dataclass
class WalkStats:
    """What one walk saw (docs/agent.md, "Index"; `agent status`)."""

    roots: list[str] = field(default_factory=list)
    directories: int = 0
    files: int = 0
    modules: int = 0  # x86-64 ELF executables and shared objects
    hashed: int = 0  # candidates whose SHA-256 was computed (or found in the cache)
    unreadable: int = 0
    seconds: float = 0.0
    finished: float | None = None  # time.time() when it ended


Changes = tuple[list[Copy], list[Copy]]  # (added, removed)


class ModuleIndex:
    """Copies of the watched module builds on this host (see the module doc)."""

    def __init__(self, files: FileCache | None = None) -> None:
        self.files = files or FileCache()
        self.wanted = Wanted()
        self._copies: dict[Inode, Copy] = {}
        self._paths: dict[str, Inode] = {}
        self._checked: dict[str, float] = {}  # indexed path -> monotonic time last confirmed
        self._lock = threading.Lock()
        self._noatime = True

    # --- reads (any thread) -------------------------------------------------------

    def get(self, inode: Inode) -> Copy | None:
        with self._lock:
            return self._copies.get(inode)

    def copies(self) -> list[Copy]:
        with self._lock:
            return list(self._copies.values())

    def paths_of(self, target: TargetView) -> list[str]:
        """Every path found holding this target's build."""
        with self._lock:
            found = [p for c in self._copies.values() if target in c.targets for p in c.paths]
        return sorted(found)

    # --- changes (the indexer thread) ---------------------------------------------

    def set_targets(self, targets: Iterable[TargetView]) -> tuple[bool, list[Copy]]:
        """Look for these targets from now on: (a walk is needed because a build is
        new, the copies that no target wants any more)."""
        wanted = Wanted.of(targets)
        new = bool(wanted.keys() - self.wanted.keys())
        self.wanted = wanted
        removed = []
        with self._lock:
            for inode, c in list(self._copies.items()):
                c.targets = tuple(t for t in wanted.targets if c.file.matches(t))
                if not c.targets:
                    removed.append(self._drop(inode))
        return new, removed

    def examine(self, dir_fd: int, name: str, path: str) -> Changes:
        """Look at one directory entry (a file created, renamed into place, written):
        what it adds to the index or takes from it."""
        return self._update(dir_fd, name, path, None)

    def forget(self, path: str) -> list[Copy]:
        """A path is gone (deleted, renamed away): the copies left without a name."""
        removed = self._unlink(path)
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self._paths if p.startswith(prefix)]:  # a directory moved
            removed += self._unlink(p)
        return removed

    def walk(
        self,
        root: str,
        stats: WalkStats,
        *,
        skip: frozenset[str] = frozenset(),
        between: Callable[[], bool] = lambda: True,
        on_change: Callable[[Changes], None] = lambda _: None,
    ) -> bool:
        """Walk one directory tree on one filesystem (not into `skip`, the other mount
        points, nor across a device); `between` is called every few hundred entries
        and stops the walk by returning False. Paths under `root` that this walk did
        False if it was stopped (the caller then keeps what it had: `forget_unseen`
        only after complete walks)."""
        started = time.monotonic()
        stats.roots.append(root)
        try:
            dev = os.stat(root).st_dev
        except OSError as e:
            log.warning("cannot index %s: %s", root, e.strerror)
            return True
        stack = [root]
        count = 0
        while stack:
            directory = stack.pop()
            try:
                dfd = os.open(directory, _DIR_FLAGS)
            except OSError:
                stats.unreadable += 1
                continue
            try:
                if os.fstat(dfd).st_dev != dev:
                    continue  # a mount that mountinfo did not list (it raced)
                stats.directories += 1
                with os.scandir(dfd) as entries:
                    for entry in entries:
                        count += 1
                        if count % BETWEEN_EVERY == 0 and not between():
                            return False
                        path = _join(directory, entry.name)
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                if path not in skip:
                                    stack.append(path)
                                continue
                            if not entry.is_file(follow_symlinks=False):
                                continue
                        except OSError:
                            continue
                        stats.files += 1
                        changes = self._update(dfd, entry.name, path, stats)
                        if changes[0] or changes[1]:
                            on_change(changes)
            except OSError:
                stats.unreadable += 1
            finally:
                os.close(dfd)
        stats.seconds += time.monotonic() - started
        return True

    def forget_unseen(self, since: float, roots: Iterable[str]) -> list[Copy]:
        """After complete walks of `roots` begun at `since` (monotonic): the paths
        under them that neither a walk nor an event confirmed since are gone."""
        gone: list[Copy] = []
        prefixes = tuple(r.rstrip("/") + "/" for r in roots)
        for path in [p for p in self._paths if p.startswith(prefixes) or p in roots]:
            if self._checked.get(path, 0.0) < since:
                gone += self._unlink(path)
        return gone

    # --- inside ---------------------------------------------------------------------

    def _update(self, dfd: int, name: str, path: str, stats: WalkStats | None) -> Changes:
        found = self._look(dfd, name, path, stats)
        old = self._paths.get(path)
        removed = []
        if old is not None and (found is None or found.file.inode != old):
            removed = self._unlink(path)
        if found is None:
            return [], removed
        added, replaced = self._add(found, path)
        return added, removed + replaced

    def _look(self, dfd: int, name: str, path: str, stats: WalkStats | None) -> Copy | None:
        """The copy this entry is, if it is a watched build (see the module doc)."""
        try:
            fd = self._open(dfd, name)
        except OSError:
            if stats is not None:
                stats.unreadable += 1
            return None
        try:
            # Not a page more than asked for: a cold walk reads one block per file,
            # not the readahead window.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            if os.pread(fd, 4, 0) != ELF_MAGIC:
                return None
            peeked = peek(lambda offset, size: os.pread(fd, size, offset))
            if not peeked.module:
                return None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < peeked.extent:
                return None  # a separate debug file: the same build-id, no code
            if stats is not None:
                stats.modules += 1
            targets = self.wanted.candidates(peeked.build_id, name)
            if not targets:
                return None
            if stats is not None:
                stats.hashed += 1
            module = self.files.of_fd(fd, path)
        except OSError:
            return None
        finally:
            os.close(fd)
        matched = tuple(t for t in targets if module.matches(t))
        return Copy(module, matched) if matched else None

    def _open(self, dfd: int, name: str) -> int:
        if self._noatime:
            try:
                return os.open(name, _FILE_FLAGS | os.O_NOATIME, dir_fd=dfd)
            except PermissionError as e:
                if e.errno != errno.EPERM:
                    raise
                self._noatime = False  # not the owner and no CAP_FOWNER: atime it is
        return os.open(name, _FILE_FLAGS, dir_fd=dfd)

    def _add(self, found: Copy, path: str) -> Changes:
        """Record `path` as a name of the copy found there: (added, replaced)."""
        with self._lock:
            self._checked[path] = time.monotonic()
            inode = found.file.inode
            replaced = []
            current = self._copies.get(inode)
            if current is not None and current.file.identity != found.file.identity:
                replaced.append(self._drop(inode))  # rewritten in place: another build now
                current = None
            self._paths[path] = inode
            if current is None:
                found.paths.add(path)
                self._copies[inode] = found
                return [found], replaced
            current.paths.add(path)
            return [], replaced

    def _unlink(self, path: str) -> list[Copy]:
        with self._lock:
            self._checked.pop(path, None)
            inode = self._paths.pop(path, None)
            c = self._copies.get(inode) if inode is not None else None
            if c is None or inode is None:
                return []
            c.paths.discard(path)
            if c.paths:
                return []
            return [self._drop(inode)]

    def _drop(self, inode: Inode) -> Copy:
        c = self._copies.pop(inode)
        for p in c.paths:
            if self._paths.get(p) == inode:
                del self._paths[p]
                self._checked.pop(p, None)
        return c


def _join(directory: str, name: str) -> str:
    return directory + name if directory.endswith("/") else f"{directory}/{name}"


def directory_path(fd: int) -> str | None:
    """The path of an open directory, None if it was deleted."""
    with contextlib.suppress(OSError):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith("/") and not path.endswith(" (deleted)"):
            return path
    return None
