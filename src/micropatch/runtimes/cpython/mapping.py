"""Mapping the page into a stopped interpreter, and finding it again.

Made by the target itself through one of its stopped threads
(`process.syscall.RemoteSyscalls`, crash-safe): memfd_create, ftruncate,
mmap private read+execute anywhere, mprotect of everything after the code
page to read+write, close. The code is written through /proc/PID/mem, then
the header's magic, last: a page without the magic was never armed, nothing
refers to it, and the next operation unmaps it (as it closes a leftover
descriptor of a patcher killed between memfd_create and close).
"""

from __future__ import annotations

import contextlib
import logging
import os

from micropatch.arch.x86_64.abi import (
    SYS_CLOSE,
    SYS_FTRUNCATE,
    SYS_MMAP,
    SYS_MPROTECT,
    SYS_MUNMAP,
)
from micropatch.errors import MicropatchError
from micropatch.faults import checkpoint
from micropatch.process.linux import (
    MAP_PRIVATE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)
from micropatch.process.maps import Mapping
from micropatch.process.syscall import RemoteSyscalls
from micropatch.runtimes.cpython import page as P
from micropatch.runtimes.cpython.interpreter import Interpreter
from micropatch.runtimes.cpython.trampoline import assemble

log = logging.getLogger(__name__)

FD_LINK = P.MAPS_NAME + " (deleted)"


def usable_page(syscalls: RemoteSyscalls, mappings: list[Mapping]) -> P.Page | None:
    """The process's initialized page; pages a killed patcher mapped but never
    initialized are unmapped, and its leftover descriptors closed."""
    memory = syscalls.proc.memory
    found = None
    for address in P.find_pages(mappings):
        page = P.Page(address)
        if page.initialized(memory) and found is None:
            found = page
        elif not page.initialized(memory):
            log.info("process %d: unmapping a page never initialized", syscalls.proc.pid)
            syscalls(SYS_MUNMAP, address, P.SIZE)
    for fd in leftover_descriptors(syscalls.proc.pid):
        syscalls(SYS_CLOSE, fd)
    return found


def leftover_descriptors(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{name}") == FD_LINK:
                    found.append(int(name))
    return found


def create_page(
    syscalls: RemoteSyscalls, mappings: list[Mapping], interpreter: Interpreter
) -> P.Page:
    memory = syscalls.proc.memory
    fd = syscalls.memfd_create(P.NAME)
    checkpoint("py-memfd-created")
    try:
        syscalls.checked(SYS_FTRUNCATE, fd, P.SIZE)
        address = syscalls.checked(SYS_MMAP, 0, P.SIZE, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0)
        checkpoint("py-page-mapped")
        result = syscalls(SYS_MPROTECT, address + P.HEADER, P.SIZE - P.HEADER,
                          PROT_READ | PROT_WRITE)  # fmt: skip
        if result != 0:
            syscalls(SYS_MUNMAP, address, P.SIZE)
            raise syscalls.error(SYS_MPROTECT, result)
    finally:
        syscalls(SYS_CLOSE, fd)
    page = P.Page(address)
    try:
        code, hijack = assemble(interpreter.functions, address)
        memory.write(address + P.CODE, code)
        page.write_u32(memory, P.H_HIJACK, hijack)
        memory.write(address + P.HEADER, P.MAGIC)  # last: from now on it may be armed
    except MicropatchError:
        with contextlib.suppress(MicropatchError):
            syscalls(SYS_MUNMAP, address, P.SIZE)
        raise
    checkpoint("py-page-ready")
    log.info("process %d: mapped the interpreter page at %#x", syscalls.proc.pid, address)
    return page
