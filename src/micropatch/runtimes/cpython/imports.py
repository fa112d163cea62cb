"""Which modules a CPython process imported, read from its memory: without
stopping it and without running anything in it.

`sys.modules` is the interpreter's dict (`interp->modules`; 3.12+:
`interp->imports.modules`, `versions.Layout.interp_modules`). A dict's
entries are read as CPython 3.11-3.13 lay them out (the same in the three:
`PyDictObject.ma_keys`, `PyDictKeysObject` with its index table, then its
entries, 16 bytes each for str keys, 24 otherwise), and a key only when its
type is `str` (the interpreter's exported `PyUnicode_Type`) in the compact
ASCII form module names take. A module's file is its `__file__`, read the
same way from the module's own dict.

The process keeps running while it is read, so a dict may change under the
reader: every pointer read is checked (types, sizes, bounds) before it is
followed; a dict's live entries must be as many as it says (`ma_used`: a
table being filled by a resize has fewer), and its size, version tag and keys
table (`ma_version_tag` moves with every change of a dict) the same after its
entries were read as before; a read that fails any is tried again, and after
`READ_ATTEMPTS` the process is reported unreadable. A name whose value is
None (an import that is blocked) is not imported, as the runner's
`sys.modules.get` sees it; nor is anything in an interpreter not initialized yet
(a program that embeds libpython and has not called `Py_Initialize`) or without
a `sys.modules`.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass

from micropatch.errors import InterpreterError, MemoryAccessError
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.runtimes.cpython.interpreter import Interpreter, find_interpreter

READ_ATTEMPTS = 3
OB_TYPE = 8
MA_USED, MA_VERSION, MA_KEYS, MA_VALUES = 16, 24, 32, 40
DK_LOG2_SIZE, DK_LOG2_INDEX_BYTES, DK_KIND, DK_NENTRIES, DK_INDICES = 8, 9, 10, 24, 32
DICT_KEYS_GENERAL, DICT_KEYS_UNICODE = 0, 1
STR_LENGTH, STR_STATE = 16, 32
MD_DICT = 16
# 262,144 slots: more than any sys.modules or module dict; bounds what a torn read reads
MAX_LOG2_SIZE = 18
MAX_TEXT = 4096  # longest module name or file path read
INLINE = 56  # characters read with a str's header (most module names)


class _Torn(Exception):
    """A structure read while it changed (or not what it should be): read again."""


@dataclass(frozen=True)
class Imports:
    """A CPython process's imported modules, as read from its memory."""

    pid: int
    version: str  # the interpreter's release, "3.11.2"
    modules: dict[str, str | None]  # module name -> its __file__ (None: it has none)


def imported(pid: int, wanted: Collection[str] | None = None) -> Imports:
    """The modules `pid` imported (only those of `wanted`, if given), each with its
    file. InterpreterError if `pid` runs no supported CPython; MemoryAccessError
    if sys.modules kept changing under the reader."""
    mappings = read_maps(pid)
    with Memory(pid, writable=False) as memory:
        interpreter = find_interpreter(pid, mappings, memory)
        return Imports(pid, interpreter.version, read_modules(interpreter, memory, wanted))


def read_modules(
    interpreter: Interpreter, memory: Memory, wanted: Collection[str] | None = None
) -> dict[str, str | None]:
    """`imported` of an interpreter already found: module name -> its __file__."""
    reader = _Reader(interpreter, memory)
    for attempt in range(READ_ATTEMPTS):
        try:
            return reader.modules(wanted)
        except (_Torn, MemoryAccessError):
            if attempt == READ_ATTEMPTS - 1:
                raise MemoryAccessError(
                    f"process {interpreter.pid}: its sys.modules kept changing while it was "
                    f"read ({READ_ATTEMPTS} attempts); try again",
                    pid=interpreter.pid,
                ) from None
    raise AssertionError("unreachable")


def has_module(pid: int, module: str) -> bool:
    """Whether `pid` imported `module` (a Python patch's target)."""
    return module in imported(pid, (module,)).modules


class _Reader:
    def __init__(self, interpreter: Interpreter, memory: Memory) -> None:
        self.memory = memory
        self.interpreter = interpreter
        self.str_type = _symbol(interpreter, "PyUnicode_Type")
        self.module_type = _symbol(interpreter, "PyModule_Type")
        self.none = _symbol(interpreter, "_Py_NoneStruct")
        # The interned str "__file__": the key of every module's __file__ (importlib
        # sets it as an attribute, whose names are interned), found once by its text,
        # then recognised by its address without reading any other key.
        self.file_key: int | None = None

    def _pointer(self, address: int) -> int:
        value: int = struct.unpack("<Q", self.memory.read(address, 8))[0]
        return value

    def modules(self, wanted: Collection[str] | None) -> dict[str, str | None]:
        interpreter = self.interpreter
        if not self._pointer(interpreter.runtime + interpreter.layout.runtime_interp_main):
            return {}  # Python not initialized (yet: a program embedding it): none imported
        interp = interpreter.main_interpreter(self.memory)
        modules = self._pointer(interp + interpreter.layout.interp_modules)
        if not modules:
            return {}  # no sys.modules yet (or any longer, while it finalizes)
        found = {}
        stamp = self._stamp(modules)
        for key, value in self._items(modules):
            name = self._str(key)
            if name is None or (wanted is not None and name not in wanted):
                continue
            if value != self.none:
                found[name] = self._file(value)
        if self._stamp(modules) != stamp:
            raise _Torn()  # changed while read: what was read may be anything
        return found

    def _stamp(self, address: int) -> bytes:
        """A dict's size, version tag and keys table: the same before and after a read
        (the tag changes with every change of the dict) means the read saw one state."""
        return self.memory.read(address + MA_USED, MA_VALUES - MA_USED)

    def _items(self, address: int) -> list[tuple[int, int]]:
        """The (key, value) pointers of a dict's live entries, as many as it says it
        holds (`ma_used`; a table being resized says fewer)."""
        if not address:
            raise _Torn()
        used, _version, keys, values = struct.unpack(
            "<qQQQ", self.memory.read(address + MA_USED, 32)
        )
        if values:
            raise _Torn()  # not a dict, or a split table (instance dicts only)
        head = self.memory.read(keys, DK_INDICES)
        log2_size, log2_index_bytes = head[DK_LOG2_SIZE], head[DK_LOG2_INDEX_BYTES]
        kind = head[DK_KIND]
        entries = struct.unpack("<q", head[DK_NENTRIES : DK_NENTRIES + 8])[0]
        if log2_size > MAX_LOG2_SIZE or kind not in (DICT_KEYS_GENERAL, DICT_KEYS_UNICODE):
            raise _Torn()
        if not 0 <= entries <= (2 << log2_size) // 3 + 1:
            raise _Torn()
        width = 16 if kind == DICT_KEYS_UNICODE else 24
        start = keys + DK_INDICES + (1 << log2_index_bytes)
        data = self.memory.read(start, entries * width) if entries else b""
        items = []
        for i in range(entries):
            fields = struct.unpack_from("<QQ" if width == 16 else "<QQQ", data, i * width)
            key, value = fields[-2:]
            if key and value:
                items.append((key, value))
        if len(items) != used:
            raise _Torn()
        return items

    def _str(self, address: int) -> str | None:
        """A compact ASCII str's text; None for any other object (a non-ASCII name
        cannot be a patch's module). One read for a short one."""
        size = self.interpreter.layout.ascii_size
        head = self.memory.read(address, size + INLINE)
        if struct.unpack_from("<Q", head, OB_TYPE)[0] != self.str_type:
            return None
        length = struct.unpack_from("<q", head, STR_LENGTH)[0]
        state = struct.unpack_from("<I", head, STR_STATE)[0]
        compact, ascii = state >> 5 & 1, state >> 6 & 1
        if not (compact and ascii) or not 0 <= length <= MAX_TEXT:
            return None
        text = head[size : size + length] if length <= INLINE else (
            self.memory.read(address + size, length))  # fmt: skip
        return text.decode("ascii", "replace")

    def _file(self, module: int) -> str | None:
        """A module object's `__file__`, None if it has none (a built-in module)."""
        if self._pointer(module + OB_TYPE) != self.module_type:
            return None
        namespace = self._pointer(module + MD_DICT)
        if not namespace:
            return None
        stamp = self._stamp(namespace)
        items = self._items(namespace)
        found = None
        if self.file_key is not None:
            found = next((self._str(v) for k, v in items if k == self.file_key), None)
        else:
            for key, value in items:
                if self._str(key) == "__file__":
                    self.file_key, found = key, self._str(value)
                    break
        if self._stamp(namespace) != stamp:
            raise _Torn()
        return found


def _symbol(interpreter: Interpreter, name: str) -> int:
    address = interpreter.image.symbol(name)
    if address is None:
        raise InterpreterError(
            f"process {interpreter.pid}: {interpreter.path} does not export {name}",
            pid=interpreter.pid,
        )
    return address
