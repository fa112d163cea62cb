"""Thin ctypes binding of fanotify(7): a group, its marks, its events and answers.

Only what the agent needs: a content-class group (permission events) to hold an
exec or a library open while it seizes the process, with filesystem and inode
marks and the allow/deny answer; and a notification group reporting the
directory's file handle and the entry's name (`FAN_REPORT_DFID_NAME`) of files
created, renamed into place or written, to keep its index of module files
current. The kernel allows every event still held when the group's descriptor
is closed, so a dying reader never leaves an exec blocked.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from micropatch.errors import FanotifyUnavailable

# fanotify_init flags (include/uapi/linux/fanotify.h)
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_CLASS_CONTENT = 0x4
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_TID = 0x100
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_DONT_FOLLOW = 0x4
FAN_MARK_INODE = 0x0
FAN_MARK_MOUNT = 0x10
FAN_MARK_FLUSH = 0x80
FAN_MARK_FILESYSTEM = 0x100
# event masks
FAN_CLOSE_WRITE = 0x8
FAN_CLOSE_NOWRITE = 0x10
FAN_OPEN = 0x20
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_OPEN_EXEC = 0x1000
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_ACCESS_PERM = 0x20000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_ONDIR = 0x40000000
PERMISSION_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM
# answers
FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100
# information records after the metadata (FAN_REPORT_*FID*)
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3

# struct fanotify_event_metadata { u32 event_len; u8 vers; u8 reserved;
#   u16 metadata_len; aligned_u64 mask; s32 fd; s32 pid; }
METADATA = struct.Struct("<IBBHQii")
# struct fanotify_response { s32 fd; u32 response; }
RESPONSE = struct.Struct("<iI")
# struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }, then for the
# fid types: __kernel_fsid_t fsid (two s32); struct file_handle { u32 handle_bytes;
# s32 handle_type; u8 f_handle[]; }; for DFID_NAME a NUL-terminated name follows.
INFO_HEADER = struct.Struct("<BBH")
FSID = struct.Struct("<ii")
HANDLE_HEADER = struct.Struct("<Ii")
# Flags of the descriptors the kernel opens for us, one per event.
EVENT_FILE_FLAGS = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC
READ_SIZE = 64 * METADATA.size  # one read returns whole records only
FID_READ_SIZE = 1 << 16  # records with handles and names are longer

# The libc this interpreter runs with, by its handle (dlopen(NULL)): no search for it,
# which `ctypes.util.find_library` does by running `ldconfig -p` in a child process.
_libc = ctypes.CDLL(None, use_errno=True)
_init = _libc.fanotify_init
_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_init.restype = ctypes.c_int
_mark = _libc.fanotify_mark
_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_mark.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


@dataclass(frozen=True)
class FileId:
    """Where an event happened, in a group reporting file handles: the filesystem
    (`fsid`), the directory's `handle` (a struct file_handle, for
    `open_by_handle_at`) and, with FAN_REPORT_NAME, the entry's `name`."""

    fsid: tuple[int, int]
    handle: bytes
    name: str | None = None


@dataclass(frozen=True)
class FanotifyEvent:
    """One event record: `fd` is a read-only descriptor of the file (FAN_NOFD for
    an overflow), opened for us; `pid` the thread's id with FAN_REPORT_TID."""

    mask: int
    fd: int
    pid: int
    fid: FileId | None = None  # groups made with FAN_REPORT_DIR_FID (or _FID)

    @property
    def permission(self) -> bool:
        """The opening thread waits for our answer."""
        return bool(self.mask & PERMISSION_EVENTS)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)


def parse_events(data: bytes) -> list[FanotifyEvent]:
    """The records in one read() of a fanotify group; ValueError on a record the
    kernel would never write (wrong version, truncated)."""
    events = []
    offset = 0
    while offset + METADATA.size <= len(data):
        event_len, vers, _, metadata_len, mask, fd, pid = METADATA.unpack_from(data, offset)
        if vers != FANOTIFY_METADATA_VERSION:
            raise ValueError(f"fanotify event version {vers}, expected {FANOTIFY_METADATA_VERSION}")
        if event_len < METADATA.size or metadata_len < METADATA.size:
            raise ValueError(f"fanotify event of {event_len} bytes is shorter than its header")
        if offset + event_len > len(data):
            raise ValueError("truncated fanotify event")
        fid = _file_id(data[offset + metadata_len : offset + event_len])
        events.append(FanotifyEvent(mask, fd, pid, fid))
        offset += event_len
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} stray bytes after the fanotify events")
    return events


_FID_RECORDS = (FAN_EVENT_INFO_TYPE_FID, FAN_EVENT_INFO_TYPE_DFID, FAN_EVENT_INFO_TYPE_DFID_NAME)


def _file_id(records: bytes) -> FileId | None:
    """The first directory (or file) id record among an event's information records."""
    at = 0
    while at + INFO_HEADER.size <= len(records):
        kind, _, length = INFO_HEADER.unpack_from(records, at)
        if kind == 0 and length == 0:
            break  # zero bytes to the end of the event: no record (a group without FID)
        if length < INFO_HEADER.size or at + length > len(records):
            raise ValueError(f"fanotify information record of {length} bytes is malformed")
        body = records[at + INFO_HEADER.size : at + length]
        if kind in _FID_RECORDS:
            if len(body) < FSID.size + HANDLE_HEADER.size:
                raise ValueError("fanotify file id record shorter than its header")
            fsid = FSID.unpack_from(body)
            size, _ = HANDLE_HEADER.unpack_from(body, FSID.size)
            end = FSID.size + HANDLE_HEADER.size + size
            if end > len(body):
                raise ValueError("fanotify file handle runs past its record")
            name = None
            if kind == FAN_EVENT_INFO_TYPE_DFID_NAME:
                name = os.fsdecode(body[end:].split(b"\0", 1)[0])
            return FileId(fsid, body[FSID.size : end], name)
        at += length
    return None


def open_by_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH | os.O_CLOEXEC) -> int:
    """A descriptor of the file a handle names, on the filesystem of `mount_fd`
    (needs CAP_DAC_READ_SEARCH); OSError (ESTALE: it is gone)."""
    fd = _open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
    return int(fd)


def response(fd: int, allow: bool = True) -> bytes:
    """The answer to a permission event, as written to the group."""
    return RESPONSE.pack(fd, FAN_ALLOW if allow else FAN_DENY)


class Fanotify:
    """A fanotify group. Thread-safe as the kernel makes it: one reader, any
    number of answering threads."""

    def __init__(
        self,
        flags: int = FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID,
        event_flags: int = EVENT_FILE_FLAGS,
    ) -> None:
        fd = _init(flags, event_flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise _unavailable(err, "fanotify_init")
        self.fd = fd

    def mark(self, path: str, mask: int, flags: int = FAN_MARK_INODE, *, add: bool = True) -> None:
        """Add (or remove) a mark on `path`; OSError with the kernel's errno."""
        how = (FAN_MARK_ADD if add else FAN_MARK_REMOVE) | flags
        if _mark(self.fd, how, mask, AT_FDCWD, os.fsencode(path)) != 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.ENOSYS):
                raise _unavailable(err, f"fanotify_mark on {path}")
            raise OSError(err, f"fanotify_mark on {path}: {os.strerror(err)}", path)

    def flush(self, flags: int = FAN_MARK_INODE) -> None:
        """Remove every inode mark (FAN_MARK_FILESYSTEM / _MOUNT: those marks)."""
        if _mark(self.fd, FAN_MARK_FLUSH | flags, 0, AT_FDCWD, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_mark flush: {os.strerror(err)}")

    def read(self, size: int = READ_SIZE) -> list[FanotifyEvent]:
        """The events ready now ([] if none: the descriptor is non-blocking)."""
        try:
            data = os.read(self.fd, size)
        except BlockingIOError:
            return []
        return parse_events(data)

    def answer(self, fd: int, allow: bool = True) -> None:
        """Answer a permission event (does not close its descriptor)."""
        os.write(self.fd, response(fd, allow))

    def close(self) -> None:
        """Close the group: the kernel allows every event still held."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Fanotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unavailable(err: int, what: str) -> FanotifyUnavailable:
    if err == errno.EPERM:
        hint = "needs CAP_SYS_ADMIN (run the agent as root)"
    elif err in (errno.ENOSYS, errno.EINVAL):
        hint = (
            "this kernel lacks fanotify permission events (CONFIG_FANOTIFY and "
            "CONFIG_FANOTIFY_ACCESS_PERMISSIONS) or FAN_REPORT_TID (Linux 4.20+)"
        )
    else:
        hint = os.strerror(err)
    return FanotifyUnavailable(
        f"{what} failed: {errno.errorcode.get(err, str(err))}: {hint}; new processes cannot "
        "be patched before they run"
    )
