"""The one exception hierarchy of micropatch.

Every error says what was wrong, where, and what to do about it. Each layer
raises the subclasses that describe its own failures; the CLI prints the
message and exits non-zero.
"""

from __future__ import annotations


class MicropatchError(Exception):
    """Root of every error micropatch raises on purpose."""


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
    """A branch in the containing function targets a byte inside the site."""


class RelocationError(SiteError):
    """A displaced instruction cannot be moved to the trampoline."""


# --- process/ ---------------------------------------------------------------


class ProcessError(MicropatchError):
    """A target process cannot be inspected or controlled."""


class ProcessNotFound(ProcessError):
    """No process with that pid exists."""


class ProcessExited(ProcessError):
    """The process exited (or became a zombie) during the operation."""


class AlreadyTraced(ProcessError):
    """Another tracer (a debugger, strace) already controls the process."""


class TracePermissionDenied(ProcessError):
    """The kernel refuses to let us trace the process."""


class RemoteSyscallError(ProcessError):
    """A system call made on behalf of the target failed or was refused."""


class MemoryAccessError(ProcessError):
    """Reading or writing the target's memory failed."""


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


class CaveError(MicropatchError):
    """No cave could be placed within reach of the module, or its registry is corrupt."""


# --- tools/ -----------------------------------------------------------------


class ToolError(MicropatchError):
    """An author tool (explore, diff) was asked something it cannot answer."""
