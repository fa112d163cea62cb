"""The build helper: compiles a CPython patch with the target's own interpreter.

`build` runs this file's text (joined after codeid.py's) as
`PYTHON -I -c TEXT REQUEST.json`, where PYTHON is the interpreter of the
version the patch is for: bytecode, its marshal format and the `ast` module
belong to one Python version. It prints one JSON document on stdout.

For each patchlet it compiles the module's source twice, as the import system
does (`compile(source, path, "exec", dont_inherit=True, optimize=0)`): once as
shipped, to find the original function's code by its qualified name and its
identity; once with the function changed in the syntax tree (a guard inserted
first in its body, or the body replaced), so that the new code is compiled in
the function's real scope: the same class (`super()`, `__class__`), the same
globals and free variables. Line numbers are kept, so tracebacks still point
at the module's source.
"""

import ast
import dis
import hashlib
import io
import json
import marshal
import sys
from types import CodeType
from typing import Any

if __package__:  # imported from micropatch (tests); run as text, codeid.py comes first
    from micropatch.runtimes.cpython.codeid import code_identity

STATE_MODULE = "__micropatch_cpython__"
# CO_VARARGS, CO_VARKEYWORDS, CO_GENERATOR, CO_COROUTINE, CO_ITERABLE_COROUTINE, CO_ASYNC_GENERATOR
_SIGNATURE_FLAGS = 0x04 | 0x08 | 0x20 | 0x80 | 0x100 | 0x200


class Refused(Exception):
    """A problem with the patch, reported to the author."""


def _interpreter() -> dict[str, Any]:
    import importlib.util

    return {
        "implementation": sys.implementation.name,
        "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "full_version": sys.version.split()[0],
        "hexversion": sys.hexversion,
        "magic": importlib.util.MAGIC_NUMBER.hex(),
        "executable": sys.executable,
    }


def _find_code(code: CodeType, qualname: str) -> list[CodeType]:
    found = []
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_qualname == qualname:
                found.append(const)
            found.extend(_find_code(const, qualname))
    return found


def _find_def(tree: ast.Module, qualname: str) -> tuple[list[ast.stmt], int]:
    """The body list holding the function's definition, and its index there."""
    parts = qualname.split(".")
    body = tree.body
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
        matches = [i for i, n in enumerate(body) if isinstance(n, kinds) and n.name == part]
        if len(matches) != 1:
            what = "function" if last else "class"
            many = f"defined {len(matches)} times" if matches else "not defined"
            scope = "its class" if depth else "the module"
            raise Refused(f"{what} {'.'.join(parts[: depth + 1])} is {many} at the top of {scope}")
        if last:
            return body, matches[0]
        node = body[matches[0]]
        assert isinstance(node, ast.ClassDef)
        body = node.body
    raise AssertionError("unreachable")


def _module_globals(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        for sub in (
            ast.walk(node)
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            else [node]
        ):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names.add(sub.id)
            elif isinstance(sub, ast.alias):
                names.add((sub.asname or sub.name).split(".")[0])
    return names


def _parameters(node: ast.AST) -> list[str]:
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return names


def _check_names(expr: ast.AST, field: str, allowed: set[str], where: str) -> None:
    import builtins

    for node in ast.walk(expr):
        if isinstance(node, ast.Name) and node.id not in allowed and not hasattr(builtins, node.id):
            raise Refused(
                f"name {node.id!r} in {field} is neither a parameter of {where}, a global of "
                "the module nor a builtin"
            )


def _guard(
    node: ast.stmt, patchlet: dict[str, Any], patch_id: str, index: int, globals_: set[str]
) -> None:
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    params = _parameters(node)
    where = f"{patchlet['at']}({', '.join(params)})"
    when = ast.parse(patchlet["when"], mode="eval").body
    then_text = patchlet["then"]
    blocked = then_text.lstrip().startswith("blocked") and ";" in then_text
    if blocked:
        then_text = then_text.split(";", 1)[1]
    then = ast.parse(then_text.strip()).body[0]
    allowed = set(params) | globals_
    _check_names(when, "when", allowed, where)
    _check_names(then, "then", allowed, where)
    body: list[ast.stmt] = [then]
    if blocked:
        count = (
            f"getattr(__import__('sys').modules.get({STATE_MODULE!r}), 'blocked', len)"
            f"({patch_id!r})"  # one counter per patch, as native guards count
        )
        body.insert(0, ast.parse(count).body[0])
    guard = ast.If(test=when, body=body, orelse=[])
    for sub in ast.walk(guard):  # the guard is reported on the def line
        if isinstance(sub, ast.expr | ast.stmt):
            sub.lineno = sub.end_lineno = node.lineno
            sub.col_offset, sub.end_col_offset = 0, 0
    fn_body = node.body
    docstring = (
        fn_body
        and isinstance(fn_body[0], ast.Expr)
        and isinstance(fn_body[0].value, ast.Constant)
        and isinstance(fn_body[0].value.value, str)
    )
    fn_body.insert(1 if docstring else 0, guard)


def _replace(body: list[ast.stmt], index: int, text: str) -> ast.stmt:
    original = body[index]
    new = ast.parse(text).body[0]
    assert isinstance(original, ast.FunctionDef | ast.AsyncFunctionDef)
    assert isinstance(new, ast.FunctionDef | ast.AsyncFunctionDef)
    if _parameters(new) != _parameters(original):
        raise Refused(
            f"the replacement takes ({', '.join(_parameters(new))}), the original "
            f"{original.name} takes ({', '.join(_parameters(original))}): keep the same parameters"
        )
    ast.increment_lineno(new, original.lineno - new.lineno)
    new.decorator_list = original.decorator_list
    body[index] = new
    return new


def _dis(code: CodeType) -> str:
    out = io.StringIO()
    dis.dis(code, file=out)
    return out.getvalue()


def _compile(tree: ast.Module, path: str) -> CodeType:
    return compile(tree, path, "exec", dont_inherit=True, optimize=0)


def _function(request: dict[str, Any], source: bytes, index: int) -> dict[str, Any]:
    patchlet = request["patchlets"][index]
    qualname, path = patchlet["at"], request["module_path"]
    module_code = compile(source, path, "exec", dont_inherit=True, optimize=0)
    original_code = _find_code(module_code, qualname)
    if len(original_code) != 1:
        problem = "defined more than once" if original_code else "not found"
        raise Refused(f"function {qualname}: {problem} in {path}")
    original = original_code[0]
    tree = ast.parse(source, path)
    body, at = _find_def(tree, qualname)
    original_source = ast.get_source_segment(source.decode("utf-8", "replace"), body[at]) or ""
    if patchlet["kind"] == "guard":
        _guard(body[at], patchlet, request["patch_id"], index, _module_globals(tree))
        node = body[at]
    else:
        node = _replace(body, at, patchlet["python"])
    found = _find_code(_compile(tree, path), qualname)
    if len(found) != 1:
        raise Refused(f"function {qualname}: the patched module defines it {len(found)} times")
    patched = found[0]
    for name in ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount"):
        if getattr(patched, name) != getattr(original, name):
            raise Refused(f"the patched {qualname} has another {name}")
    if (patched.co_flags ^ original.co_flags) & _SIGNATURE_FLAGS:
        raise Refused(
            f"the patched {qualname} changes its kind (generator, coroutine, *args, **kwargs)"
        )
    if patched.co_freevars != original.co_freevars:
        raise Refused(
            f"the patched {qualname} uses the enclosing variables {list(patched.co_freevars)}, "
            f"the original {list(original.co_freevars)}: a function's code can only be "
            "replaced by one with the same free variables"
        )
    return {
        "at": qualname,
        "signature": f"{qualname}({', '.join(_parameters(node))})",
        "original_identity": code_identity(original),
        "patched_identity": code_identity(patched),
        "code": marshal.dumps(patched).hex(),
        "original_source": original_source,
        "patched_source": ast.unparse(node),
        "original_dis": _dis(original),
        "patched_dis": _dis(patched),
    }


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        request = json.load(f)
    reply: dict[str, Any] = {"interpreter": _interpreter()}
    try:
        with open(request["module_path"], "rb") as f:
            source = f.read()
        reply["sha256"] = hashlib.sha256(source).hexdigest()
        functions = []
        for index in range(len(request["patchlets"])):
            try:
                functions.append(_function(request, source, index))
            except Refused as exc:
                at = request["patchlets"][index]["at"]
                raise Refused(f"patchlet[{index}] ({at}): {exc}") from None
        reply.update(ok=True, functions=functions)
    except (Refused, SyntaxError, OSError, UnicodeDecodeError) as exc:
        reply.update(ok=False, error=str(exc))
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
