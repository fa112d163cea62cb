"""The one exception hierarchy of micropatch.

Every error says what was wrong, where, and what to do about it. Each layer
raises the subclasses that describe its own failures; the CLI prints the
message and exits non-zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

TYPE_CHECKING = False  # not imported from typing: every command imports this module
if TYPE_CHECKING:
    from typing import Any, ClassVar

FIELDS = ("pid", "patch_id", "module", "offset")


class MicropatchError(Exception):
    """Root of every error micropatch raises on purpose.

    Besides its message, an error carries what it is about as fields, for the
    programs that read them (the agent, the server): `pid`, `patch_id`,
    `module` (a file name) and `offset` (a module offset), each None when it
    does not apply or is not known where the error is raised. Layers above add
    what they know with `within`, which keeps the exception, its type and its
    cause chain.
    """

    # Attributes a subclass carries besides the four fields (Busy: holder); they
    # cross the agent's socket too (see `to_wire`).
    extra_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str = "",
        *,
        pid: int | None = None,
        patch_id: str | None = None,
        module: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.patch_id = patch_id
        self.module = module
        self.offset = offset

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def within(
        self,
        context: str = "",
        *,
        pid: int | None = None,
        patch_id: str | None = None,
        module: str | None = None,
        offset: int | None = None,
    ) -> MicropatchError:
        """Prefix the message with `context` (`"patch fix-a, patchlet[0]: "`) and
        fill the fields not yet known; returns self, to `raise` again."""
        if context:
            self.args = (f"{context}{self.message}", *self.args[1:])
        self.pid = self.pid if self.pid is not None else pid
        self.patch_id = self.patch_id if self.patch_id is not None else patch_id
        self.module = self.module if self.module is not None else module
        self.offset = self.offset if self.offset is not None else offset
        return self

    def hint(self, advice: str) -> MicropatchError:
        """Append what to do (`"; apply it first: ..."`) to the message, as a layer
        above knows it; returns self, to `raise` again."""
        self.args = (f"{self.message}{advice}", *self.args[1:])
        return self

    def fields(self) -> dict[str, object]:
        """The error as data: its class, message and the fields that are set."""
        data: dict[str, object] = {"error": type(self).__name__, "message": self.message}
        for name in (*FIELDS, *self.extra_fields):
            value = getattr(self, name, None)
            if value is not None:
                data[name] = value
        return data


# --- patch/ -----------------------------------------------------------------


class PatchFormatError(MicropatchError):
    """A patch source is malformed: bad TOML, a missing or invalid field."""


class AssemblyError(PatchFormatError):
    """A patchlet's assembly does not assemble."""


class UnresolvedReference(MicropatchError):
    """A reference in patchlet code (symbol, offset) cannot be resolved."""


class ArtifactError(MicropatchError):
    """A built patch artifact (.mpatch) is malformed, corrupt or of an unknown format."""


class SignatureError(MicropatchError):
    """A key file is malformed, or an artifact lacks a valid signature by a trusted key."""


class NotAdmitted(SignatureError):
    """Admission refuses a patch file: a source, or unverifiable without keys."""


# --- elf/ -------------------------------------------------------------------


class ElfError(MicropatchError):
    """A module file cannot be read or parsed as a 64-bit x86 ELF object."""


class SymbolNotFound(ElfError):
    """A symbol named by a patch does not exist in the module."""


class AmbiguousSymbol(ElfError):
    """A symbol name names several different addresses in the module (e.g. statics)."""


class FunctionBoundsUnknown(ElfError):
    """Neither the symbol table nor .eh_frame says which function holds an offset."""


# --- x86/ -------------------------------------------------------------------


class SiteError(MicropatchError):
    """A site cannot be patched safely as asked."""


class NotInstructionBoundary(SiteError):
    """The site offset falls inside an instruction."""


class BranchIntoSite(SiteError):
    """A branch in the containing function, or in a patchlet's body, targets a
    byte inside a site (which the jump overwrites)."""


class RelocationError(SiteError):
    """A displaced instruction cannot be moved to the trampoline."""


class StackError(SiteError):
    """A patchlet body's use of the stack cannot be proven right where it runs: rsp
    not restored where it leaves, a store at or above the return address, a
    `[frame+N]` where the body's stack depth is not known."""


# --- process/ ---------------------------------------------------------------


class ProcessError(MicropatchError):
    """A target process cannot be inspected or controlled."""


class ProcessNotFound(ProcessError):
    """No process with that pid exists."""


class ProcessExited(ProcessError):
    """The process exited (or became a zombie) during the operation."""


class StopTimeout(ProcessError):
    """A thread did not enter a ptrace stop in time (busy machine, uninterruptible sleep);
    nothing was changed, and the operation may be retried."""


class AlreadyTraced(ProcessError):
    """Another tracer (a debugger, strace) already controls the process."""


class Busy(ProcessError):
    """Another micropatch operation on the same process held its lock past the timeout.

    `holder` is the pid of the micropatch process holding it, when it said so."""

    extra_fields = ("holder",)

    def __init__(
        self,
        message: str = "",
        *,
        holder: int | None = None,
        pid: int | None = None,
        patch_id: str | None = None,
    ) -> None:
        super().__init__(message, pid=pid, patch_id=patch_id)
        self.holder = holder


class TracePermissionDenied(ProcessError):
    """The kernel refuses to let us trace the process."""


class SelectionError(MicropatchError):
    """A filter of `--all` (`--all --user ...`) cannot be understood."""


class RemoteSyscallError(ProcessError):
    """A system call made on behalf of the target failed or was refused."""


class MemoryAccessError(ProcessError):
    """Reading or writing the target's memory failed."""


class FanotifyUnavailable(ProcessError):
    """fanotify permission events cannot be used: the kernel lacks them, or we lack
    CAP_SYS_ADMIN."""


# --- live/ ------------------------------------------------------------------


class ModuleError(MicropatchError):
    """The target module is absent from a process or is not the patch's version."""


class ModuleNotLoaded(ModuleError):
    """The process does not map the module the patch targets."""


class ModuleMismatch(ModuleError):
    """The process maps a module of that name, but of another build."""


class OriginalBytesMismatch(SiteError):
    """The bytes at a site are not the ones the patch expects."""


class UnsafeToPatch(MicropatchError):
    """A thread kept executing inside a site or trampoline through every retry."""


class NotApplied(MicropatchError):
    """The patch to remove or update is not applied to the process."""


class AlreadyApplied(MicropatchError):
    """The patch (this or another version) is already applied to the process."""


class Downgrade(AlreadyApplied):
    """An update would replace a patch by an older version of it."""


class LockError(MicropatchError):
    """The per-process lock directory or file cannot be used (see `live/lock.py`)."""


class CaveError(MicropatchError):
    """No cave could be placed within reach of the module, or its registry is corrupt."""


# --- runtimes/cpython/ -------------------------------------------------------


class InterpreterError(MicropatchError):
    """A process's Python interpreter cannot be found, read or patched: not CPython,
    an unsupported version, a layout we cannot verify."""


class ModuleNotImported(ModuleNotLoaded):
    """A CPython patch's module is not in the process's sys.modules (yet)."""


class CodeMismatch(ModuleMismatch):
    """A function's code in the process, or the module's source file, is not the one
    the patch was built against."""


class NoSafePoint(UnsafeToPatch):
    """No thread of an interpreter reached a point where Python code may run (the
    GIL held, between bytecodes) within the time allowed; nothing was changed."""


class PatchRefused(MicropatchError):
    """The code running inside the interpreter refused the change (an audit hook,
    a module changed under it, an exception of its own); nothing was changed."""


# --- tools/ -----------------------------------------------------------------


class ToolError(MicropatchError):
    """An author tool (explore, diff) was asked something it cannot answer."""


# --- agent/ -----------------------------------------------------------------


class AgentError(MicropatchError):
    """The host agent refused a request, or cannot do what it was asked."""


class ConfigError(AgentError):
    """The agent's configuration file cannot be read or has an invalid value."""


class UnknownPatch(AgentError):
    """No patch with that id is in the agent's store."""


class ControlError(AgentError):
    """The agent's control socket cannot be reached, or refused the request
    (a peer that is not root, a write verb from the read-only group, a bad request)."""


# --- server/ ----------------------------------------------------------------


class ServerError(MicropatchError):
    """The fleet server cannot do what was asked: bad configuration, storage, or request."""


class RepositoryError(ServerError):
    """The TUF repository cannot be created or changed: missing keys, bad layout, a
    threshold that cannot be met."""


class UpdateError(MicropatchError):
    """A client of the TUF repository refused what it was served (rollback, freeze,
    mix-and-match, tampered target) or could not reach it."""


# --- across a socket ---------------------------------------------------------------


def _known(cls: type[MicropatchError]) -> dict[str, type[MicropatchError]]:
    found = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        found.update(_known(sub))
    return found


# Every error class of this module by name, as both ends of the agent's socket know
# it. Classes defined elsewhere (GuardError, CCompileError, ...) cross as the nearest
# of their bases listed here.
ERRORS: Mapping[str, type[MicropatchError]] = MappingProxyType(_known(MicropatchError))


def to_wire(error: MicropatchError) -> dict[str, object]:
    """An error as JSON data: `fields()` (its class, message and fields), and its
    bases up to MicropatchError as `kinds`, so that a reader that does not know the
    class itself still raises the nearest one it knows (`from_wire`)."""
    kinds = [c.__name__ for c in type(error).__mro__ if issubclass(c, MicropatchError)]
    return {**error.fields(), "kinds": kinds}


def from_wire(data: Mapping[str, Any]) -> MicropatchError:
    """The error `to_wire` described, as the same class (or the nearest known base;
    AgentError if none is known), with its message and fields; never raises."""
    names = [data.get("error"), *(data.get("kinds") or ())]
    cls = next((ERRORS[n] for n in names if isinstance(n, str) and n in ERRORS), AgentError)
    error = cls.__new__(cls)
    values = {name: data.get(name) for name in FIELDS}
    MicropatchError.__init__(error, str(data.get("message", "")), **values)
    for name in cls.extra_fields:
        setattr(error, name, data.get(name))
    return error
