"""The payload of a CPython artifact: what `build` proved about a Python patch.

Same envelope as a native payload (format, format_version, patch, builder),
with `"runtime": "cpython"` and, instead of a module file and sites, the
interpreter the code was compiled for, the module's name and source hash,
and per patchlet the original function's code identity (`expect`) and the
compiled replacement code (marshal, for that interpreter version only).
Strict and closed like the native payload: docs/python-patches.md and
docs/signing.md describe every field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from micropatch.errors import ArtifactError
from micropatch.patch.python import PythonPatch
from micropatch.patch.source import parse_source
from micropatch.trust.payload import BuilderFacts, PatchFacts, _hex, _Strict

RUNTIME = "cpython"


class InterpreterFacts(_Strict):
    """The interpreter the code was compiled by: the target must be the same version."""

    implementation: str  # "cpython"
    version: str  # "3.11": major.minor, what the bytecode format belongs to
    magic: str  # importlib.util.MAGIC_NUMBER, hex: the bytecode format itself
    compiled_by: str  # the full version of the interpreter `build` ran, e.g. "3.11.2"

    @field_validator("magic")
    @classmethod
    def _magic(cls, value: str) -> str:
        return _hex(value, 4)


class SourceFacts(_Strict):
    """The module: its name in the process and its source file."""

    name: str  # __name__ in sys.modules
    file: str  # base name of the file given to `build`
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        return _hex(value, 32)


class FunctionFacts(_Strict):
    """One patchlet: the function it changes and the code that replaces its code."""

    patchlet: int = Field(ge=0)
    at: str  # qualified name in the module
    kind: Literal["guard", "replacement"]
    signature: str  # for people: name(parameters)
    expect: str  # the original code's identity (runtimes/cpython/codeid.py)
    patched: str  # the replacement code's identity
    code: str  # marshal.dumps of the replacement code object, hex
    blocked: bool  # its guard counts blocked attempts
    original_source: str
    patched_source: str
    original_dis: str  # dis.dis of both, made by the compiling interpreter, for `inspect`
    patched_dis: str

    @field_validator("expect", "patched")
    @classmethod
    def _identity(cls, value: str) -> str:
        return _hex(value, 32)

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        return _hex(value)

    @property
    def code_bytes(self) -> bytes:
        return bytes.fromhex(self.code)


class PythonPayload(_Strict):
    """Everything the id and the signatures of a CPython artifact cover."""

    format: str
    format_version: int
    runtime: Literal["cpython"]
    patch: PatchFacts
    python: InterpreterFacts
    module: SourceFacts
    functions: list[FunctionFacts] = Field(min_length=1)
    builder: BuilderFacts


def python_patch_of(payload: PythonPayload, name: str) -> PythonPatch:
    """The patch to apply: parsed from the payload's source and checked against
    what `build` recorded (identity, one function per patchlet, in order), with
    each patchlet's `expect` set to the recorded original code identity."""

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{name}: {problem}; the artifact is inconsistent, rebuild it")

    patch = parse_source(payload.patch.source, f"{name}: {payload.patch.source_name}")
    if not isinstance(patch, PythonPatch):
        raise bad("its source is a native patch, but it is labelled a CPython one")
    if (patch.id, patch.version) != (payload.patch.id, payload.patch.version):
        raise bad(
            f"its source is patch {patch.id} v{patch.version}, but it is labelled "
            f"{payload.patch.id} v{payload.patch.version}"
        )
    target = patch.target
    if (target.module, target.sha256) != (payload.module.name, payload.module.sha256):
        raise bad(
            f"its source targets {target.module} (sha256 {target.sha256}), but it was built "
            f"for {payload.module.name} (sha256 {payload.module.sha256})"
        )
    if target.python is not None and target.python != payload.python.version:
        raise bad(f"its source is for Python {target.python}, built for {payload.python.version}")
    functions = sorted(payload.functions, key=lambda f: f.patchlet)
    if [f.patchlet for f in functions] != list(range(len(patch.patchlets))):
        raise bad(f"its source has {len(patch.patchlets)} patchlets, but functions are recorded "
                  f"for {[f.patchlet for f in functions]}")  # fmt: skip
    patchlets = []
    for function, patchlet in zip(functions, patch.patchlets, strict=True):
        if function.at != patchlet.at or function.kind != patchlet.kind:
            raise bad(f"patchlet[{function.patchlet}] is a {patchlet.kind} at {patchlet.at!r}, "
                      f"but a {function.kind} at {function.at!r} was built")  # fmt: skip
        if patchlet.expect is not None and patchlet.expect != function.expect:
            raise bad(f"patchlet[{function.patchlet}] expects code {patchlet.expect}, but the "
                      f"module holds {function.expect}")  # fmt: skip
        if function.blocked != patchlet.counts_blocked:
            raise bad(f"patchlet[{function.patchlet}]: blocked counting disagrees with its source")
        patchlets.append(patchlet.model_copy(update={"expect": function.expect}))
    return patch.model_copy(update={"patchlets": tuple(patchlets)})
