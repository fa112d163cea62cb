"""Process exits (and execs, forks) from the kernel's proc connector.

The proc connector multicasts one netlink message per process event to the
sockets that subscribed with ``PROC_CN_MCAST_LISTEN``
(include/uapi/linux/cn_proc.h, drivers/connector/cn_proc.c). An exit event
is sent from ``do_exit`` for every thread and carries the thread's
``exit_code`` -- for a death by signal, the signal number in bits 0-6 and
0x80 if a core was dumped; for ``exit(n)``, ``n << 8`` -- which is how a
crash is told from a normal exit after the process is gone, without being
its parent or its tracer. ``exit_signal`` is something else: the signal the
kernel sends the *parent* (SIGCHLD, or -1 for a thread), never the cause of
death.

Constraints the kernel imposes, turned into errors or data here:

- Before Linux 6.6 subscribing needs CAP_NET_ADMIN (binding to the multicast
  group fails with EPERM, or the kernel acknowledges with EPERM); 6.6 lets
  anyone listen, since /proc tells the same. The kernel silently ignores a
  subscriber outside the initial user and pid namespaces: `ExitWatcher`
  waits for the kernel's acknowledgement and raises `ConnectorError` if none
  comes.
- Events are delivered best effort: when the socket's receive buffer
  overflows the kernel drops them and the next ``recv`` fails with ENOBUFS.
  `ExitWatcher.read` returns an `Overrun` then, so the caller rescans
  /proc for what it may have missed.
- Since Linux 6.6 a subscriber can ask for some event kinds only
  (``struct proc_input``); older kernels ignore that request and send every
  kind, which `ExitWatcher` filters itself.

The messages themselves, and the events decoded from them, are in
`process.procevents`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType

from micropatch.errors import ProcessError
from micropatch.process.procevents import (
    CN_IDX_PROC,
    CRASH_SIGNALS,
    KINDS,
    NETLINK_CONNECTOR,
    OP,
    PROC_CN_MCAST_IGNORE,
    PROC_CN_MCAST_LISTEN,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_INPUT,
    Ack,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    Overrun,
    ProcEvent,
    parse,
    request,
)

# The watcher's interface: it, and the events it yields (decoded in procevents).
__all__ = [
    "CRASH_SIGNALS",
    "ConnectorError",
    "ExecEvent",
    "ExitEvent",
    "ExitWatcher",
    "ForkEvent",
    "Overrun",
    "ProcEvent",
]

log = logging.getLogger(__name__)


class ConnectorError(ProcessError):
    """The proc connector cannot be used: no privilege, another namespace, no support."""


class ExitWatcher:
    """A subscription to the proc connector; yields exits (and execs, forks if asked).

    ``with ExitWatcher() as w: for event in w.read(1.0): ...``. ``read``
    returns the events of one datagram (often one), ``[]`` on timeout, or
    ``[Overrun()]`` when the kernel dropped events. Iterating blocks until
    `close` (from another thread) ends it. Not thread-safe for concurrent
    readers: one thread reads, any thread may close.
    """

    def __init__(
        self,
        kinds: Iterable[str] = ("exit",),
        *,
        receive_buffer: int = 4 << 20,
        ack_timeout: float = 2.0,
    ) -> None:
        self.kinds = frozenset(kinds)
        unknown = self.kinds - KINDS.keys()
        if unknown or not self.kinds:
            raise ValueError(f"event kinds must be among {sorted(KINDS)}: got {sorted(kinds)}")
        self._mask = 0
        for kind in self.kinds:
            self._mask |= KINDS[kind]
        self._receive_buffer = receive_buffer
        self._ack_timeout = ack_timeout
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._closed = False
        self._reading = False
        self._lock = threading.Lock()
        self.overruns = 0

    # -- life cycle --------------------------------------------------------

    def open(self) -> ExitWatcher:
        """Bind to the proc connector's group and subscribe; raises `ConnectorError`."""
        if self._sock is not None:
            return self
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR
            )
        except OSError as e:
            raise ConnectorError(
                f"cannot open a NETLINK_CONNECTOR socket: {e.strerror}; "
                "is the kernel built with CONFIG_PROC_EVENTS?"
            ) from e
        try:
            self._set_buffer(sock)
            try:
                sock.bind((0, CN_IDX_PROC))
            except PermissionError as e:
                raise ConnectorError(
                    "cannot subscribe to process events (proc connector): binding to its "
                    "netlink group needs CAP_NET_ADMIN; run the agent as root"
                ) from e
            self._sock = sock
            self._subscribe()
        except BaseException:
            sock.close()
            self._sock = None
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        return self

    def _set_buffer(self, sock: socket.socket) -> None:
        # SO_RCVBUFFORCE passes rmem_max as root; without it the plain option caps.
        force = getattr(socket, "SO_RCVBUFFORCE", 33)
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, self._receive_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._receive_buffer)

    def _subscribe(self) -> None:
        assert self._sock is not None
        seq = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        ack = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        # The plain form first: every kernel acknowledges it to a listener of every
        # kind, which proves the subscription took (the kernel ignores, without an
        # error, a subscriber outside the initial namespaces).
        self._sock.send(request(OP.pack(PROC_CN_MCAST_LISTEN), seq, ack))
        self._await_ack(seq, ack)
        if self._mask != PROC_EVENT_EXIT | PROC_EVENT_EXEC | PROC_EVENT_FORK:
            # Then narrow it (6.6+; an older kernel ignores this, and we filter).
            self._sock.send(
                request(PROC_INPUT.pack(PROC_CN_MCAST_LISTEN, self._mask), seq + 1, ack)
            )

    def _await_ack(self, seq: int, ack: int) -> None:
        assert self._sock is not None
        deadline = time.monotonic() + self._ack_timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                break
            try:
                data = self._sock.recv(65536)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue
                raise
            for item in parse(data):
                # send_msg numbers every message itself (seq), so only ack identifies ours.
                if isinstance(item, Ack) and item.ack == (ack + 1) & 0xFFFFFFFF:
                    if item.err == errno.EPERM:
                        raise ConnectorError(
                            "the proc connector refused the subscription: this kernel "
                            "needs CAP_NET_ADMIN for it; run the agent as root"
                        )
                    if item.err:
                        raise ConnectorError(
                            f"the proc connector refused the subscription: {os.strerror(item.err)}"
                        )
                    return
        raise ConnectorError(
            f"the proc connector did not acknowledge the subscription within "
            f"{self._ack_timeout:g} s: the kernel ignores subscribers outside the initial "
            "user and pid namespaces; run the agent on the host, not in a container"
        )

    def close(self) -> None:
        """Unsubscribe and close; wakes a thread blocked in `read` or iteration,
        which releases the socket on its way out."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sock = self._sock
            if sock is not None:
                try:
                    # Without IGNORE the kernel keeps counting us as a listener (and
                    # keeps building events) after the socket is gone.
                    sock.send(request(OP.pack(PROC_CN_MCAST_IGNORE), 0, 0))
                except OSError as e:
                    log.debug("proc connector: unsubscribe failed: %s", e)
            if self._reading:
                os.write(self._wake_w, b"x")
            else:
                self._release()

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> ExitWatcher:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # getattr: __init__ may have raised before setting them.
        if getattr(self, "_sock", None) is not None and not getattr(self, "_reading", True):
            with contextlib.suppress(Exception):
                self.close()

    def fileno(self) -> int:
        """The netlink socket, for a caller's own poll loop (then call `read(0)`)."""
        if self._sock is None:
            raise ConnectorError("the ExitWatcher is not open")
        return self._sock.fileno()

    # -- reading -----------------------------------------------------------

    def read(self, timeout: float | None = None) -> list[ProcEvent]:
        """The next events: ``[]`` after ``timeout`` seconds (None: wait) or once
        closed, ``[Overrun()]`` if the kernel dropped some since the last read."""
        with self._lock:
            if self._closed:
                return []
            if self._sock is None:
                self.open()
            self._reading = True
        try:
            return self._read(timeout)
        finally:
            with self._lock:
                self._reading = False
                if self._closed:
                    self._release()

    def _read(self, timeout: float | None) -> list[ProcEvent]:
        assert self._sock is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [], left)
            if self._closed:
                break
            if not ready:
                return []
            try:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overruns += 1
                    log.warning("proc connector: events dropped (receive buffer overrun)")
                    return [Overrun()]
                raise
            events = self._wanted(parse(data))
            if events:
                return events
            if deadline is not None and time.monotonic() >= deadline:
                return []
        return []

    def _wanted(self, items: list[ExitEvent | ExecEvent | ForkEvent | Ack]) -> list[ProcEvent]:
        # Acknowledgements (ours or other subscribers') are dropped, and so are kinds
        # not asked for, which a kernel older than 6.6 sends anyway.
        wanted: list[ProcEvent] = []
        for item in items:
            if (
                (isinstance(item, ExitEvent) and "exit" in self.kinds)
                or (isinstance(item, ExecEvent) and "exec" in self.kinds)
                or (isinstance(item, ForkEvent) and "fork" in self.kinds)
            ):
                wanted.append(item)
        return wanted

    def __iter__(self) -> Iterator[ProcEvent]:
        """Every event until `close`."""
        while not self._closed:
            yield from self.read(None)
