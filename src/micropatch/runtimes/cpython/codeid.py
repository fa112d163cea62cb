"""The identity of a code object: what `expect` pins, the same in every run.

This file runs in three interpreters: the patcher's, the one `build` compiles
with (`--python`, any supported version) and the target's (inside the runner).
So it imports only the standard library and uses no `from __future__` import
(its text is joined with the compiler's or the runner's). Inside a target it
imports nothing it can avoid: an import reads files, which releases the GIL,
and a thread that keeps the GIL long (a C extension) then delays the runner by
as long as it keeps it, at every release (`sha256`).

The identity is the SHA-256 of a canonical, length-prefixed encoding of what
decides behaviour: argument counts, flags, the bytecode (`co_code`, which is
the unspecialized, uninstrumented bytecode in 3.11+), the exception table,
the names, local, free and cell variable names, the name and qualified name,
and the constants, recursively (a nested function's code by its own
identity; a frozenset's members sorted, so hash randomization cannot reorder
them). Left out on purpose: the file name, the first line and the line and
position tables, so the same function installed at another path, or shifted
by a comment above it, is the same code; the module file's own SHA-256 pins
the file.
"""

import sys

IDENTITY_VERSION = 1


def sha256(data: bytes) -> bytes:
    """The SHA-256 of `data`, by hashlib if the process imported it, else by the C
    module behind it (3.11: `_sha256`, 3.12+: `_sha2`; built in on Debian's)."""
    for name in ("hashlib", "_sha2", "_sha256"):
        if name in sys.modules:
            return bytes(sys.modules[name].sha256(data).digest())
    for name in ("_sha2", "_sha256"):
        if name in sys.builtin_module_names:
            return bytes(__import__(name).sha256(data).digest())
    import hashlib

    return hashlib.sha256(data).digest()


def code_identity(code: object) -> str:
    """The identity of a code object, 64 hex digits."""
    prefix = b"micropatch-code-identity-%d\0" % IDENTITY_VERSION
    return sha256(prefix + _code_bytes(code)).hex()


def _code_bytes(code: object) -> bytes:
    get = code.__getattribute__
    fields = (
        get("co_argcount"), get("co_posonlyargcount"), get("co_kwonlyargcount"),
        get("co_flags"), get("co_code"), getattr(code, "co_exceptiontable", b""),
        get("co_names"), get("co_varnames"), get("co_freevars"), get("co_cellvars"),
        get("co_name"), get("co_qualname"), get("co_consts"),
    )  # fmt: skip
    return b"".join(_value(field) for field in fields)


def _value(value: object) -> bytes:
    if value is None:
        return b"N"
    if value is Ellipsis:
        return b"."
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        return _tagged(b"i", str(value).encode())
    if isinstance(value, float):
        return _tagged(b"f", value.hex().encode())
    if isinstance(value, complex):
        return _tagged(b"c", f"{value.real.hex()} {value.imag.hex()}".encode())
    if isinstance(value, str):
        return _tagged(b"s", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return _tagged(b"b", value)
    if isinstance(value, tuple):
        return _tagged(b"(", b"".join(_value(item) for item in value))
    if isinstance(value, frozenset):
        return _tagged(b"{", b"".join(sorted(_value(item) for item in value)))
    if hasattr(value, "co_code"):
        return _tagged(b"C", code_identity(value).encode())
    return _tagged(b"?", f"{type(value).__name__}:{value!r}".encode())


def _tagged(tag: bytes, body: bytes) -> bytes:
    return tag + len(body).to_bytes(8, "little") + body
