"""One module opened for the author tools: its functions, imports, and what each
function's code refers to, computed once per function in one linear sweep.

A `ModuleAnalysis` owns its caches; make one per module and drop it when done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, NamedTuple

from micropatch.elf.image import ElfImage
from micropatch.elf.plt import Imports, read_imports
from micropatch.elf.sections import SectionMap
from micropatch.elf.strings import c_string_at
from micropatch.errors import FunctionBoundsUnknown, SymbolNotFound
from micropatch.tools.functions import Function, list_functions
from micropatch.tools.insn import (
    Instruction,
    Shapes,
    decode,
    format_instruction,
    near_branch_target,
)

log = logging.getLogger(__name__)

# call/tailcall: a local function; import: an imported function called or jumped to;
# import-data: a GOT slot read (imported data, or a function's address);
# function: the address of code taken (a callback); data: any other address.
RefKind = Literal[
    "call", "tailcall", "import", "import-data", "string", "function", "data", "constant"
]
CALL_KINDS = frozenset({"call", "tailcall", "import"})

# Immediates and displacements below this stay in the normalised form of an
# instruction; larger ones are mostly addresses and sizes that move.
SMALL_CONSTANT = 0x1000


class Reference(NamedTuple):
    """What the instruction at `ip` refers to.

    `target` is a module offset, or the value for a constant; `name` is the
    callee's or import's name, or the text of a string. (A named tuple: a large
    module has hundreds of thousands.)
    """

    ip: int
    kind: RefKind
    target: int
    name: str | None


class Caller(NamedTuple):
    """A call to a function at `ip` in `function`; `through` is the import it goes
    through (`name@plt`: its PLT stub, `name@got`: its GOT slot, -fno-plt), None
    for a direct call."""

    function: Function
    ip: int
    through: str | None


@dataclass(frozen=True)
class Analysis:
    """The facts of one function the tools need, from one sweep of its code.

    `tokens` holds one hash per instruction of its normalised form (see
    `insn.summarise`), with the referenced string or import name folded in;
    alignment padding (nops) has none.
    """

    function: Function
    references: tuple[Reference, ...]
    branch_targets: frozenset[int]
    instructions: int
    blocks: int
    tokens: tuple[int, ...]
    valid: bool

    @property
    def callees(self) -> list[int]:
        """Offsets of the local functions this one calls or tail-calls, in order."""
        return [r.target for r in self.references if r.kind in ("call", "tailcall")]

    @property
    def code_references(self) -> list[int]:
        """`callees`, and the local code whose address is taken (callbacks), in order."""
        return [r.target for r in self.references if r.kind in ("call", "tailcall", "function")]

    @property
    def strings(self) -> list[str]:
        return [r.name for r in self.references if r.kind == "string" and r.name is not None]

    @property
    def imports(self) -> list[str]:
        """Imported functions called and imported data read, in order."""
        return [
            r.name
            for r in self.references
            if r.kind in ("import", "import-data") and r.name is not None
        ]


class ModuleAnalysis:
    """Functions, imports and per-function analyses of one module file."""

    def __init__(self, image: ElfImage, shapes: Shapes | None = None) -> None:
        """`shapes`: a decoding cache to share with another module's analysis (two
        builds of one module share most instruction encodings)."""
        self.image = image
        self.sections = SectionMap(image)
        self._analyses: dict[int, Analysis] = {}
        self._strings: dict[int, str | None] = {}
        self._kinds: dict[int, tuple[RefKind, str | None]] = {}
        self._shapes = shapes if shapes is not None else Shapes(SMALL_CONSTANT)

    @classmethod
    def open(cls, path: str | Path, shapes: Shapes | None = None) -> ModuleAnalysis:
        return cls(ElfImage.open(path), shapes)

    @cached_property
    def imports(self) -> Imports:
        return read_imports(self.image, self.sections)

    @cached_property
    def functions(self) -> list[Function]:
        """Every known function, sorted by start."""
        return list_functions(self.image, self.sections)

    @cached_property
    def _starts(self) -> list[int]:
        return [f.start for f in self.functions]

    @cached_property
    def _by_start(self) -> dict[int, Function]:
        return {f.start: f for f in self.functions}

    @cached_property
    def _names(self) -> dict[str, list[Function]]:
        names: dict[str, list[Function]] = {}
        for function in self.functions:
            for name in (function.label, *function.aliases):
                names.setdefault(name, []).append(function)
                base = name.split("@", 1)[0]
                if base != name:
                    names.setdefault(base, []).append(function)
        return names

    def at(self, start: int) -> Function | None:
        """The function starting at `start`, if one does."""
        return self._by_start.get(start)

    def containing(self, offset: int) -> Function:
        """The function holding `offset`, with the bounds `build` uses for its site check."""
        start, end = self.image.function_at(offset)
        known = self._by_start.get(start)
        if known is not None and known.end == end:
            return known
        return Function(start, end, known.name if known else None, (), "symbol")

    def named(self, name: str) -> list[Function]:
        """The functions called `name` (a static may have several), or `fn_<hex>`."""
        return list(self._names.get(name, []))

    def find(self, what: str) -> Function:
        """The function for a name, `fn_<hex>`, a location (`name+0x10`) or an offset (`0xN`)."""
        return self.locate(what)[0]

    def locate(self, what: str) -> tuple[Function, int]:
        """`find`, and the module offset `what` names (the start for a function name)."""
        found = self.named(what)
        if len(found) == 1:
            return found[0], found[0].start
        if len(found) > 1:
            where = ", ".join(f"{f.start:#x}" for f in found)
            raise SymbolNotFound(
                f"{self.image.name}: {len(found)} functions are called {what!r} ({where}); "
                "name one by its offset (0xN)"
            )
        try:
            offset = self.image.resolve(what)
        except SymbolNotFound as exc:
            exc.add_note("explore functions MODULE lists the names this module has")
            raise
        try:
            return self.containing(offset), offset
        except FunctionBoundsUnknown as exc:
            exc.add_note("explore functions MODULE lists the functions known in this module")
            raise

    def code(self, function: Function) -> bytes:
        return self.image.read_upto(function.start, function.size)

    def decode(self, function: Function) -> list[Instruction]:
        """The instructions of a function, by linear sweep from its start."""
        return decode(self.code(function), function.start)

    def listing(self, function: Function) -> list[tuple[Instruction, str]]:
        """Each instruction of `function` with its text, a direct call or jump out of
        the function naming its target (`call xmlFree`, `call fn_9cb00`); jumps
        inside the function keep their offset. `explore show` and `diff --show`
        both print this."""
        named = {
            r.ip: r.name or f"fn_{r.target:x}"
            for r in self.analyse(function).references
            if r.kind in CALL_KINDS
        }
        rows = []
        for ins in self.decode(function):
            text = format_instruction(ins)
            name = named.get(ins.ip)
            if name is not None and near_branch_target(ins) is not None:
                text = f"{text.rsplit(' ', 1)[0]} {name}"  # the target is the last operand
            rows.append((ins, text))
        return rows

    def label(self, offset: int) -> str | None:
        """The name of what lives at `offset`: an import (stub or slot), a function."""
        name = self.imports.name_of(offset)
        if name is not None:
            return name
        function = self._by_start.get(offset)
        return function.name if function is not None else None

    def string_at(self, offset: int) -> str | None:
        if offset not in self._strings:
            section = self.sections.containing(offset)
            text = None
            if section is not None and not section.executable and not section.writable:
                text = c_string_at(self.image, offset)
            self._strings[offset] = text
        return self._strings[offset]

    def analyse(self, function: Function) -> Analysis:
        """References, branch targets and normalised tokens of one function (cached)."""
        analysis = self._analyses.get(function.start)
        if analysis is None or analysis.function != function:
            analysis = self._sweep(function)
            self._analyses[function.start] = analysis
        return analysis

    def analyses(self) -> list[Analysis]:
        """The analyses of every function, in address order."""
        return [self.analyse(f) for f in self.functions]

    def callers(self, start: int) -> list[Caller]:
        """Every call or tail call to the function at `start` in the module: direct,
        or through the PLT stub (or GOT slot) of a name it exports, the way a library
        calls its own interposable functions (`call parse@plt`)."""
        function = self._by_start.get(start)
        names = self.exported_names(function) if function is not None else frozenset()
        found = []
        for analysis in self.analyses():
            for r in analysis.references:
                if r.kind in ("call", "tailcall") and r.target == start:
                    found.append(Caller(analysis.function, r.ip, None))
                elif r.kind == "import" and r.name in names:
                    via = "plt" if r.target in self.imports.stubs else "got"
                    found.append(Caller(analysis.function, r.ip, f"{r.name}@{via}"))
        return found

    def exported_names(self, function: Function) -> frozenset[str]:
        """The names of `function` its module also imports: code of the module calls
        it through the PLT by these names (a relocation names `gzclose_w`, the symbol
        `gzclose_w@@ZLIB_1.2.3.5`)."""
        imported = set(self.imports.slots.values())
        names = {n.split("@", 1)[0] for n in (function.label, *function.aliases)}  # versions
        return frozenset(names & imported)

    def _classify(self, address: int) -> tuple[RefKind, str | None]:
        known = self._kinds.get(address)
        if known is None:
            known = self._kinds[address] = self._kind_of(address)
        return known

    def _kind_of(self, address: int) -> tuple[RefKind, str | None]:
        name = self.imports.stubs.get(address)
        if name is not None:
            return "import", name
        name = self.imports.slots.get(address)
        if name is not None:
            return "import-data", name
        section = self.sections.containing(address)
        if section is not None and section.executable:
            return "function", self.label(address)
        text = self.string_at(address)
        if text is not None:
            return "string", text
        return "data", None

    def _sweep(self, function: Function) -> Analysis:
        references: list[Reference] = []
        targets: set[int] = set()
        conditionals = 0
        valid = True
        absolute = not self.image.is_pie_or_shared
        base = self.image.image_base
        start, end = function.start, function.end
        tokens, special = self._shapes.sweep(self.code(function), start)
        for index, ip, next_ip, shape in special:
            valid = valid and not shape.invalid
            extra: object = None
            if shape.branch is not None:
                target = next_ip + shape.branch
                if shape.call or not start <= target < end:
                    kind, name = self._classify(target)
                    if kind == "function":
                        kind = "call" if shape.call else "tailcall"
                    elif kind == "import-data":
                        kind = "import"
                    references.append(Reference(ip, kind, target, name))
                    extra = ("c", name if kind == "import" else None)
                else:
                    targets.add(target)
                    conditionals += shape.conditional
            elif shape.rip is not None:
                address = (next_ip + shape.rip) % (1 << 64)
                kind, name = self._classify(address)
                if kind == "import-data" and (shape.call or shape.ends_flow):
                    kind = "import"  # call [rip+slot] (-fno-plt), or jmp [rip+slot]
                references.append(Reference(ip, kind, address, name))
                extra = (kind, name) if kind in ("string", "import", "import-data") else kind
            for value in shape.values:
                address = value - base
                if absolute and value >= base and self.sections.containing(address):
                    kind, name = self._classify(address)
                    references.append(Reference(ip, kind, address, name))
                    extra = (kind, name) if kind in ("string", "import", "import-data") else kind
                else:
                    references.append(Reference(ip, "constant", value, None))
            tokens[index] = shape.token if extra is None else hash((shape.form, extra))
            if shape.ends_flow and next_ip < end:
                targets.add(next_ip)
        return Analysis(
            function=function,
            references=tuple(references),
            branch_targets=frozenset(targets),
            instructions=len(tokens),  # padding aside
            blocks=1 + len(targets) + conditionals,
            tokens=tuple(tokens),
            valid=valid,
        )
