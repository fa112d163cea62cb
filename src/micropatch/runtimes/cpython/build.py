"""Build a CPython artifact: a Python patch compiled for one interpreter version.

`build` checks the module's source file against the patch's SHA-256, then runs
the build helper (compiler.py, joined after codeid.py) with the interpreter
of the version the patch is for (`python`, default: the one running
micropatch) in a subprocess: it finds each function, checks its parameters,
compiles the guard or the replacement in the function's own scope, and
reports the original and new code identities, the marshalled code and a
disassembly of both. The payload records the interpreter's version and
bytecode magic number, which the target must match.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from micropatch import __version__
from micropatch.errors import (
    ArtifactError,
    CodeMismatch,
    InterpreterError,
    ModuleError,
    PatchFormatError,
)
from micropatch.patch.python import PythonPatch
from micropatch.patch.source import parse_source
from micropatch.runtimes.cpython.versions import SUPPORTED, supported
from micropatch.trust.artifact import PythonArtifact, make_python
from micropatch.trust.envelope import FORMAT
from micropatch.trust.keys import format_time, utc_now
from micropatch.trust.payload import BuilderFacts, PatchFacts
from micropatch.trust.pypayload import (
    FunctionFacts,
    InterpreterFacts,
    PythonPayload,
    SourceFacts,
)

HELPER_TIMEOUT = 120.0


def helper_text(*names: str) -> str:
    """The text of files of this package joined, to run in another interpreter."""
    package = resources.files("micropatch.runtimes.cpython")
    return "\n".join(package.joinpath(name).read_text(encoding="utf-8") for name in names)


def build(
    source: str | Path,
    module_file: str | Path,
    *,
    python: str | None = None,
    now: datetime.datetime | None = None,
) -> PythonArtifact:
    """Compile and verify a CPython patch against its module's source file with
    `python` (an interpreter of the target's version; default: this one); the
    unsigned artifact. Raises PatchFormatError, CodeMismatch, InterpreterError..."""
    source = Path(source)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{source}: cannot read patch source: {exc.strerror}") from None
    patch = parse_source(data, str(source))
    if not isinstance(patch, PythonPatch):
        raise PatchFormatError(f'{source}: not a CPython patch ([target] runtime = "cpython")')
    module = Path(module_file)
    _check_module_file(patch, module)
    reply = _compile(patch, module, python or sys.executable)
    interpreter = reply["interpreter"]
    functions = [
        FunctionFacts(
            patchlet=index,
            at=f["at"],
            kind=patchlet.kind,
            signature=f["signature"],
            expect=f["original_identity"],
            patched=f["patched_identity"],
            code=f["code"],
            blocked=patchlet.counts_blocked,
            original_source=f["original_source"],
            patched_source=f["patched_source"],
            original_dis=f["original_dis"],
            patched_dis=f["patched_dis"],
        )
        for index, (patchlet, f) in enumerate(zip(patch.patchlets, reply["functions"], strict=True))
    ]
    for facts, patchlet in zip(functions, patch.patchlets, strict=True):
        if patchlet.expect is not None and patchlet.expect != facts.expect:
            raise CodeMismatch(
                f"{source}: {patchlet.at} in {module} has code {facts.expect}, but the patch "
                f"expects {patchlet.expect}: another version of the function",
                patch_id=patch.id, module=patch.target.module,
            )  # fmt: skip
    moment = now or _build_time()
    payload = PythonPayload(
        format=FORMAT,
        format_version=1,  # nothing of version 2 (native trampolines) in it
        runtime="cpython",
        patch=PatchFacts(
            id=patch.id,
            version=patch.version,
            title=patch.info.title,
            source_name=source.name,
            source=data.decode("utf-8"),
            model=patch.model_dump(mode="json", by_alias=True),
        ),
        python=InterpreterFacts(
            implementation=interpreter["implementation"],
            version=interpreter["version"],
            magic=interpreter["magic"],
            compiled_by=interpreter["full_version"],
        ),
        module=SourceFacts(name=patch.target.module, file=module.name, sha256=reply["sha256"]),
        functions=functions,
        builder=BuilderFacts(name="micropatch", version=__version__, built_at=format_time(moment)),
    )
    return make_python(payload, str(source))


def _check_module_file(patch: PythonPatch, module: Path) -> None:
    try:
        digest = hashlib.sha256(module.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModuleError(f"{module}: cannot read: {exc.strerror}", module=str(module)) from None
    last = patch.target.module.rpartition(".")[2]
    stem = module.parent.name if module.name == "__init__.py" else module.stem
    if module.suffix != ".py" or stem != last:
        raise ModuleError(
            f"{module} is not the source of module {patch.target.module}: expected "
            f"{last}.py or {last}/__init__.py",
            module=patch.target.module,
        )
    if digest != patch.target.sha256:
        raise CodeMismatch(
            f"{module} has SHA-256 {digest}, but the patch targets {patch.target.sha256}: "
            "another version of the module (build against the file as shipped)",
            patch_id=patch.id,
            module=patch.target.module,
        )


def _compile(patch: PythonPatch, module: Path, python: str) -> dict[str, Any]:
    request = {
        "module_path": str(module.resolve()),
        "patch_id": patch.id,
        "patchlets": [
            {"at": p.at, "kind": p.kind, "when": p.when, "then": p.then, "python": p.python}
            for p in patch.patchlets
        ],
    }
    with tempfile.TemporaryDirectory(prefix="micropatch-build-") as tmp:
        path = os.path.join(tmp, "request.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(request, f)
        try:
            done = subprocess.run(
                [python, "-I", "-c", helper_text("codeid.py", "compiler.py"), path],
                capture_output=True, text=True, timeout=HELPER_TIMEOUT, check=False,
            )  # fmt: skip
        except OSError as exc:
            raise InterpreterError(f"cannot run {python}: {exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise InterpreterError(f"{python} did not compile the patch in time") from None
    try:
        reply: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InterpreterError(
            f"{python} could not run micropatch's build helper: {last} (is it CPython 3.11 "
            "or newer?)"
        ) from None
    interpreter = reply["interpreter"]
    if not supported(interpreter["implementation"], interpreter["version"]):
        raise InterpreterError(
            f"{python} is {interpreter['implementation']} {interpreter['full_version']}: "
            f"micropatch patches CPython {', '.join(SUPPORTED)}; pass --python with one of them"
        )
    wanted = patch.target.python
    if wanted is not None and wanted != interpreter["version"]:
        raise InterpreterError(
            f"the patch is for Python {wanted}, but {python} is {interpreter['full_version']}: "
            f"pass --python with a Python {wanted} interpreter"
        )
    if not reply.get("ok"):
        raise PatchFormatError(f"patch {patch.id}: {reply.get('error')}", patch_id=patch.id)
    return reply


def _build_time() -> datetime.datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
    return utc_now()
