"""Files written whole and files read within a bound: the one way micropatch does both.

`write_atomic(path, data, mode=...)` — every file micropatch writes for keeps (the
agent's store and enrollment, keys, artifacts, the TUF repository, unit files):

- a reader, or the same program after a crash or a power cut, finds the old file
  or the new one, never half of one: the data goes to a temporary file in the same
  directory, is flushed to the disk (`fsync`), takes the file's name in one
  `rename`, and the directory is flushed too, so the rename itself survives;
- the temporary file has a name no other writer uses (`mkstemp`: threads and
  processes writing the same path never share one) and is removed on any failure;
- the file has `mode` from its creation on, whatever the umask: a private file
  (0600) is never readable by others, not even for a moment;
- `replace=False` never replaces an existing file (FileExistsError), as a key
  writer without --force must not.

`read_bounded(path, limit)` — every file micropatch reads whole from a path it was
given (artifacts, sources, configuration, metadata): at most `limit` bytes are ever
read, so a huge or endless file (`/dev/zero`) costs no more than the limit.

Both raise OSError as `open` does; each caller turns it into its layer's error with
the path and `strerror`. A file over the bound is OSError(EFBIG) whose `strerror`
says the bound. Standard library only, nothing of micropatch (rank 0 in
docs/architecture.md): every layer may use it, the CLI's light paths included.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, *, mode: int, replace: bool = True) -> Path:
    """Write `data` (str: UTF-8) as the whole of `path`, created with `mode`; see above.
    Returns the path."""
    import tempfile  # here: readers (status, the agent's client) need not load it

    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        try:
            os.fchmod(fd, mode)  # mkstemp made it 0600; before any byte is in it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and refuses an existing name (EEXIST)
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    sync_directory(path.parent)
    return path


def sync_directory(directory: str | Path) -> None:
    """Flush a directory's entries to the disk: a rename or a new file in it survives a
    power cut. A filesystem that cannot sync directories (EINVAL) is left as it is."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def read_bounded(path: str | Path, limit: int) -> bytes:
    """The whole file, if it holds at most `limit` bytes; OSError(EFBIG) otherwise,
    after reading no more than `limit` + 1 bytes."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {describe_size(limit)}", str(path))
    return data


def describe_size(size: int) -> str:
    """`64 MiB`, `1 KiB`, `100 bytes`: a limit as a person reads it."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"
