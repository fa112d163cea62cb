"""The runner: the Python code micropatch runs inside a target interpreter.

Its text (joined after codeid.py, with a last line `_run(page)`) is what the
trampoline runs with `PyRun_StringFlags`, holding the GIL at a safe point,
in a fresh globals dict holding `page`, a writable memoryview of the page's
data (runtimes/cpython/page.py). So it imports only the standard library,
binds nothing in any module of the target, and runs on CPython 3.11-3.13.

It *prepares*, never commits: it reads the operation (marshal) from the page,
checks everything (the interpreter's version and bytecode magic, the module
imported, its source file's SHA-256, every function's code identity, that
an audit hook would not refuse the change), writes the registry that will be
in force into the slot not in force, and leaves in the header a commit
callable made of C functions only (`any` over `map`s of `setattr`, the
registry's selector written through the memoryview) and a rollback. The
trampoline calls the commit after checking that the patcher has not
cancelled the operation. Every failure is reported in the result area, and
nothing of the target was changed.
"""

import sys

if __package__ or "typing" in sys.modules:
    from typing import Any
else:  # run as text in a process that never imported typing: no import (see codeid.py)
    Any = object  # type: ignore[assignment,misc]
if __package__:  # imported from micropatch (tests); run as text, codeid.py comes first
    from micropatch.runtimes.cpython.codeid import code_identity, sha256

Doc = dict[str, Any]
STATE_MODULE = "__micropatch_cpython__"
BLOCKED_SOURCE = """
def blocked(tag):
    state = modules.get(name)
    offset = state.counters.get(tag) if state is not None else None
    if offset is not None:
        value = int.from_bytes(page[offset:offset + 8], "little") + 1
        page[offset:offset + 8] = value.to_bytes(8, "little")
"""


class Refusal(Exception):
    def __init__(self, kind: str, message: str, **details: object) -> None:
        super().__init__(message)
        self.kind, self.details = kind, details


def _json(value: object) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            code = ord(ch)
            if ch in '"\\':
                out.append("\\" + ch)
            elif code < 0x20 or code > 0x7E:
                out.append("".join(f"\\u{unit:04x}" for unit in _utf16(code)))
            else:
                out.append(ch)
        return "".join(out) + '"'
    if isinstance(value, list | tuple):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_json(str(k)) + ":" + _json(v) for k, v in value.items()) + "}"
    return _json(repr(value))


def _utf16(code: int) -> list[int]:
    if code < 0x10000:
        return [code]
    code -= 0x10000
    return [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]


def _u32(page: memoryview, offset: int) -> int:
    return int.from_bytes(page[offset : offset + 4], "little")


def _registry(page: memoryview, o: Doc) -> tuple[int, bytes]:
    """The selector and the registry in force (b"" if none), as written."""
    selector = _u32(page, o["selector"])
    slot = o["slots"][selector]
    length = _u32(page, slot)
    return selector, bytes(page[slot + 36 : slot + 36 + length])


def _resolve(module: object, qualname: str) -> list[Any]:
    """The Python functions at `qualname`, outermost first: read from __dict__s (no
    descriptor, no property runs), through staticmethod/classmethod, then along
    `__wrapped__` (functools.wraps wrappers, lru_cache, contextmanager: a decorated
    function's name holds its wrapper); the caller takes the one whose code the
    patch expects."""
    obj = module
    for part in qualname.split("."):
        namespace = getattr(obj, "__dict__", None)  # a module's dict, a class's mappingproxy
        try:
            obj = namespace[part]  # type: ignore[index]
        except (KeyError, TypeError):
            raise Refusal("not-found", f"{qualname}: no {part} in {obj!r}", at=qualname) from None
        if isinstance(obj, staticmethod | classmethod):
            obj = obj.__func__
    functions, first = [], type(obj).__name__
    for _ in range(16):
        if type(obj).__name__ == "function":
            functions.append(obj)
        try:  # the instance's own dict, where update_wrapper puts it: no __getattr__ runs
            namespace = object.__getattribute__(obj, "__dict__")
        except AttributeError:
            break
        obj = namespace.get("__wrapped__") if isinstance(namespace, dict) else None
        if obj is None:
            break
    if not functions:
        raise Refusal("not-a-function", f"{qualname} is a {first}, not a Python function",
                      at=qualname)  # fmt: skip
    return functions


def _check_interpreter(patch: Doc) -> None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER.hex()
    if (version, magic) != (patch["python"], patch["magic"]):
        raise Refusal(
            "interpreter",
            f"this is Python {version} (bytecode magic {magic}); the "
            f"patch was compiled for {patch['python']} ({patch['magic']})",
        )


def _check_module(patch: Doc) -> object:
    module = sys.modules.get(patch["module"])
    if module is None:
        raise Refusal("not-imported", f"module {patch['module']} is not imported")
    spec = getattr(module, "__spec__", None)
    path = getattr(spec, "origin", None) or getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        raise Refusal("no-source", f"module {patch['module']} has no Python source file ({path!r})")
    with open(path, "rb") as f:
        digest = sha256(f.read()).hex()
    if digest != patch["sha256"]:
        raise Refusal(
            "source-mismatch",
            f"module {patch['module']}: its source {path} has SHA-256 {digest}, the patch was "
            f"built for {patch['sha256']}",
            path=path,
            found=digest,
        )
    return module


def _new_code(function: Any, fact: Doc) -> Any:
    import marshal

    code = marshal.loads(fact["code"])
    if code_identity(code) != fact["patched"]:
        raise Refusal("artifact", f"the code for {fact['at']} does not match its identity")
    code = _with_filename(code, function.__code__.co_filename)
    if len(function.__closure__ or ()) != len(code.co_freevars):
        raise Refusal("closure", f"{fact['at']} closes over other variables")
    return code


def _with_filename(code: Any, filename: str) -> Any:
    consts = tuple(_with_filename(c, filename) if hasattr(c, "co_code") else c
                   for c in code.co_consts)  # fmt: skip
    return code.replace(co_filename=filename, co_consts=consts)


def _prepare(request: Doc, state: Any, page: memoryview) -> tuple[list[list[Any]], Doc, Doc]:
    """The swaps and the new state of an apply, remove or update; raises Refusal."""
    patches = dict(getattr(state, "patches", {}))
    counters = dict(getattr(state, "counters", {}))
    op, old_id = request["op"], request.get("remove")
    patch: Doc = request.get("patch") or {}
    old: Doc | None = patches.get(old_id) if old_id else None
    if op == "apply" and patch["id"] in patches:
        version = patches[patch["id"]]["version"]
        raise Refusal("already-applied", f"patch {patch['id']} version {version} is already "
                      "applied", version=version)  # fmt: skip
    if old is None and op in ("remove", "update"):
        raise Refusal("not-applied", f"patch {old_id} is not applied", applied=sorted(patches))
    if old is not None and op == "update" and old["version"] >= patch["version"]:
        kind = "downgrade" if old["version"] > patch["version"] else "already-applied"
        raise Refusal(kind, f"patch {old_id} version {old['version']} is applied",
                      version=old["version"])  # fmt: skip
    swaps: dict[int, list[Any]] = {}  # id(function) -> [function, code now, code to install]
    if old is not None:
        for at, function, original, installed in old["functions"]:
            if function.__code__ is not installed:
                raise Refusal("changed", f"{at} was changed since patch {old_id} was applied",
                              at=at)  # fmt: skip
            swaps[id(function)] = [function, installed, original]
        del patches[old_id]
        counters.pop(old_id, None)
    if patch:
        _check_interpreter(patch)
        module = _check_module(patch)
        record = {key: patch[key] for key in ("id", "version", "title", "module", "sha256")}
        record["applied_at"] = request["now"]
        record["functions"] = []
        for fact in patch["functions"]:
            function, original = _expected(_resolve(module, fact["at"]), fact, swaps)
            code = _new_code(function, fact)
            swaps[id(function)] = [function, function.__code__, code]
            record["functions"].append((fact["at"], function, original, code))
        patches[patch["id"]] = record
        if any(f["blocked"] for f in patch["functions"]):
            counters[patch["id"]] = _free_counter(request["offsets"], counters.values(), page)
    return list(swaps.values()), patches, counters


def _expected(functions: list[Any], fact: Doc, swaps: dict[int, list[Any]]) -> tuple[Any, Any]:
    """Of the functions at one name (a wrapper, what it wraps), the one whose code
    (before a patch being replaced, if any) is what the patch expects; with that code."""
    found = None
    for function in functions:
        pending = swaps.get(id(function))
        original = pending[2] if pending else function.__code__
        identity = code_identity(original)
        if identity == fact["expect"]:
            return function, original
        found = found or identity
    raise Refusal(
        "code-mismatch",
        f"{fact['at']} has code {found}, the patch expects {fact['expect']}",
        at=fact["at"],
        found=found,
    )


def _free_counter(o: Doc, taken: Any, page: memoryview) -> int:
    for offset in range(o["counters"], o["counters"] + o["counters_size"], 8):
        if offset not in taken:
            page[offset : offset + 8] = bytes(8)
            return offset
    raise Refusal("counters", "no free blocked-attempt counter left")


def _registry_document(patches: Doc, counters: Doc, now: float) -> bytes:
    entries = [{
        "id": r["id"], "version": r["version"], "title": r["title"], "module": r["module"],
        "sha256": r["sha256"], "functions": [f[0] for f in r["functions"]],
        "applied_at": r.get("applied_at", now),
        "counter": counters.get(r["id"]),
    } for r in patches.values()]  # fmt: skip
    python = ".".join(map(str, sys.version_info[:3]))
    return _json({"format": 1, "python": python, "patches": entries}).encode("ascii")


def _state_module() -> tuple[Any, bool]:
    existing = sys.modules.get(STATE_MODULE)
    if existing is not None:
        return existing, False
    state: Any = type(sys)(STATE_MODULE)
    state.__doc__ = "micropatch: the Python patches applied to this process (do not change)"
    state.patches, state.counters, state.graveyard, state.document = {}, {}, [], b""
    return state, True


def _commit(request: Doc, page: memoryview, keep: list[Any]) -> Doc:
    import itertools

    o = request["offsets"]
    selector, in_force = _registry(page, o)
    state, new_module = _state_module()
    # (A record made by an older runner has no `document`: its registry is taken as is.)
    if in_force != getattr(state, "document", in_force):
        ids = sorted(getattr(state, "patches", {}))
        raise Refusal(
            "registry",
            f"the registry in the interpreter's page and the interpreter's record ({ids}) disagree",
        )
    swaps, patches, counters = _prepare(request, state, page)
    probe = lambda: None  # noqa: E731
    probe.__code__ = probe.__code__  # an audit hook that refuses code changes says so now
    if new_module:
        blocked_ns = {"modules": sys.modules, "name": STATE_MODULE, "page": page}
        exec(BLOCKED_SOURCE, blocked_ns)
        state.blocked = blocked_ns["blocked"]
    document = _registry_document(patches, counters, request["now"])
    slot = o["slots"][1 - selector]
    if len(document) + 36 > o["slot_size"]:
        raise Refusal("registry", "the registry would not fit its slot")
    page[slot : slot + 4] = len(document).to_bytes(4, "little")
    page[slot + 4 : slot + 36] = sha256(document)
    page[slot + 36 : slot + 36 + len(document)] = document
    functions = [s[0] for s in swaps]
    names = ["__code__"] * len(swaps)
    state.graveyard = [s[1] for s in swaps]  # freed next time
    steps: list[Any] = [
        map(setattr, functions, names, [s[2] for s in swaps]),
        map(
            setattr, [state] * 3, ["patches", "counters", "document"], [patches, counters, document]
        ),
    ]
    if new_module:
        steps.append(map(sys.modules.__setitem__, [STATE_MODULE], [state]))
    selector_at = slice(o["selector"], o["selector"] + 4)
    steps.append(map(page.__setitem__, [selector_at], [(1 - selector).to_bytes(4, "little")]))
    commit_args = (itertools.chain(*steps),)
    rollback_args = (map(setattr, functions, names, [s[1] for s in swaps]),)
    keep.extend([commit_args, rollback_args, state])
    addresses = (id(any), id(commit_args), id(any), id(rollback_args))
    page[o["commit"] : o["commit"] + 32] = b"".join(a.to_bytes(8, "little") for a in addresses)
    return {"functions": [r[0] for p in patches.values() for r in p["functions"]],
            "swaps": len(swaps)}  # fmt: skip


def _run(page: memoryview, input_at: int, input_length_at: int, kind_at: int) -> None:
    """Read the operation at `input_at` (its length at `input_length_at`), prepare it,
    report. `kind_at`: how the trampoline was entered (1: a pending call, 2: a
    thread taken from a blocking system call)."""
    import _thread
    import marshal

    length = int.from_bytes(page[input_length_at : input_length_at + 4], "little")
    request = marshal.loads(bytes(page[input_at : input_at + length]))
    o = request["offsets"]
    page[o["prepared"] : o["prepared"] + 4] = bytes(4)
    keep = globals().setdefault("_keep", [])
    hijacked = int.from_bytes(page[kind_at : kind_at + 4], "little") == 2
    prepared = False
    try:
        result = {"ok": True, **_commit(request, page, keep)}
        prepared = True
    except Refusal as refusal:
        result = {"ok": False, "error": refusal.kind, "message": str(refusal), **refusal.details}
    except Exception as exc:  # every failure is reported, none escapes
        result = {"ok": False, "error": "exception", "message": f"{type(exc).__name__}: {exc}"}
    except BaseException as exc:  # a signal handler's exception, raised in the runner
        result = {"ok": False, "error": "interrupted",
                  "message": f"interrupted by {type(exc).__name__}"}  # fmt: skip
        if not hijacked:
            _report(page, o, result, _thread.get_native_id(), False)
            raise  # a pending call: the interpreter raises it where it was
        if isinstance(exc, KeyboardInterrupt):
            _thread.interrupt_main()  # raised again once the thread is back in CPython
    _report(page, o, result, _thread.get_native_id(), prepared)


def _report(page: memoryview, o: Doc, result: Doc, tid: int, prepared: bool) -> None:
    result["tid"] = tid
    data = _json(result).encode("ascii")[: o["result_size"]]
    page[o["result"] : o["result"] + len(data)] = data
    page[o["result_len"] : o["result_len"] + 4] = len(data).to_bytes(4, "little")
    page[o["prepared"] : o["prepared"] + 4] = int(prepared).to_bytes(4, "little")
