"""The toolchain: turns a patchlet's body, whatever it is written in, into
machine code at the address where its trampoline lands.

`code` is assembled as written; a guard (`when` + `then`) and a C function
(`c`) are first compiled to assembly that saves what it uses. Guard and C
bodies always push (the flags first), so the engine steps over the red zone
before them except at a function's entry; their generated code names the
function's stack as `[frame+N]` (`bodies.frame`) and restores rsp with
`lea rsp, [frame]` before it leaves by a jump.

A toolchain is an object, not module state: it owns the C compiler command and
the cache of compiled C bodies, and a toolchain made for a signed artifact
holds the C code that was signed and runs no compiler at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

from micropatch.bodies.assemble import assemble
from micropatch.bodies.cbody import CCompileError, CompiledC, compile_c, default_compiler
from micropatch.bodies.frame import StackContext
from micropatch.errors import MicropatchError, PatchFormatError

if TYPE_CHECKING:
    from micropatch.patch.model import Patch
    from micropatch.patch.view import PatchletView

_T = TypeVar("_T")
CACHE_SIZE = 64  # compiled C bodies kept per toolchain
# Where `check` assembles bodies: any address a module could be loaded at.
_CHECK_ADDRESS = 0x10000000
# Without the module the site is not known: checked as if at a function's entry.
_UNLOCATED = StackContext(step=0, located=False)


class Toolchain:
    """Compiles and assembles patchlet bodies.

    `cc`: the C compiler command (default: $CC, else `cc`); None means no
    compiler: only the C bodies in `compiled` (keyed by source text) can be used.
    """

    def __init__(
        self,
        cc: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = default_compiler,
        *,
        compiled: Mapping[str, CompiledC] | None = None,
    ) -> None:
        self._cc = cc() if callable(cc) else cc
        self._given = dict(compiled or {})
        self._cache: OrderedDict[str, CompiledC] = OrderedDict()

    @classmethod
    def signed(cls, compiled: Mapping[str, CompiledC]) -> Toolchain:
        """A toolchain that runs exactly the C code built and signed with an artifact."""
        return cls(None, compiled=compiled)

    def compile_c(self, source: str) -> CompiledC:
        """The compiled C patchlet for `source`; CCompileError if it does not compile."""
        given = self._given.get(source)
        if given is not None:
            return given
        cached = self._cache.get(source)
        if cached is not None:
            self._cache.move_to_end(source)
            return cached
        if self._cc is None:
            raise CCompileError(
                "no compiled code for this C body: the artifact does not carry it, and "
                "applying runs only signed code; rebuild the artifact"
            )
        compiled = compile_c(source, self._cc)
        self._cache[source] = compiled
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def body_source(
        self, patchlet: PatchletView, *, at_entry: bool, counter: int | None = None
    ) -> str:
        """Assembly (with `{location}` references) for the patchlet's body.

        `at_entry`: the site is at offset 0 of a function, so `return` is possible
        and no red zone is live. `counter`: the address of the patchlet's 64-bit
        blocked-event counter, if the engine provides one. Raises PatchFormatError
        (GuardError, CCompileError) naming the field at fault.
        """
        # Each kind's compiler is imported when a body of that kind is met: applying
        # an assembly body loads neither the guard language nor the C wrapper.
        kind = patchlet.kind
        if kind == "guard":
            from micropatch.bodies.guard import guard_source
            from micropatch.patch.guard import parse_then, parse_when

            assert patchlet.when is not None and patchlet.then is not None
            when = _field("when", parse_when, patchlet.when)
            then = _field("then", parse_then, patchlet.then)
            return guard_source(when, then, at_entry=at_entry, counter=counter)
        if kind == "c":
            from micropatch.bodies.cwrapper import c_source
            from micropatch.patch.ctext import uses_blocked, uses_return

            assert patchlet.c is not None
            compiled = _field("c", self.compile_c, patchlet.c)
            return c_source(
                compiled,
                jumps=patchlet.jumps,
                at_entry=at_entry,
                returns=uses_return(patchlet.c),
                blocked=uses_blocked(patchlet.c),
                counter=counter,
            )
        return patchlet.code or ""

    def assemble(
        self,
        code: str,
        address: int,
        resolve: Callable[[str], int],
        stack: StackContext | None = None,
    ) -> bytes:
        """Machine code for assembly `code` at `address` (see `bodies.assemble`);
        with `stack`, held to the stack rules where it runs (`bodies.frame`)."""
        return assemble(code, address, resolve, stack)

    def check(self, patch: Patch) -> None:
        """Compile and assemble every body at a stand-in address, as if at a
        function's entry: the mistakes a module cannot change, without one.
        Raises PatchFormatError naming the patchlet and field."""
        for index, patchlet in enumerate(patch.patchlets):
            try:
                at_entry = self.body_source(patchlet, at_entry=True, counter=_CHECK_ADDRESS)
                self.assemble(
                    at_entry, _CHECK_ADDRESS, lambda _location: _CHECK_ADDRESS, _UNLOCATED
                )
            except MicropatchError as exc:
                exc.within(
                    f"patch {patch.id}, patchlet[{index}] ({patchlet.at}): ", patch_id=patch.id
                )
                raise


def _field(name: str, parse: Callable[[str], _T], text: str) -> _T:
    try:
        return parse(text)
    except PatchFormatError as exc:
        exc.within(f"{name}: ")
        raise
