"""The built wheel holds every file the code opens at run time (issue 16, Packaging).

`pip install .` (not editable) once shipped without `bodies/micropatch.h`, so no C
body could be built from an installed micropatch while every test passed on the
editable checkout. Here the wheel is built from the checkout (or taken from
$MICROPATCH_TEST_WHEEL: the one `.ci/run` installed) and read:

- RUNTIME_FILES: each file the code opens from its own package, found by reading
  the code (what opens it is said beside it); templates and static files are read
  from the console's code and the templates themselves;
- every file under src/micropatch that is not Python is in the wheel too;
- the modules that open package files are exactly those known here, so a new one
  makes this test fail until its files are listed.

`.ci/run` also runs the tests that build C bodies, guards and the demo against the
installed wheel; `test_the_installed_package_is_the_one_tested` checks they really
import it, not src/.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import micropatch

CHECKOUT = Path(__file__).resolve().parents[3]
SRC = CHECKOUT / "src" / "micropatch"
WHEEL_VARIABLE = "MICROPATCH_TEST_WHEEL"  # a wheel already built (.ci/run)
INSTALLED_VARIABLE = "MICROPATCH_TEST_INSTALLED"  # set when the tests run against it

# What reads files of its own package, and which.
OPENERS = {
    "bodies/cbody.py": "HEADER: the C wrapper's header, given to cc",
    "demo/runner.py": "vulnerable.c, compiled by `micropatch demo`",
    "server/database.py": "MIGRATIONS: alembic's script_location",
    "server/console/pages.py": "SERVER_DIR / templates (Jinja2) and / static (StaticFiles)",
    "runtimes/cpython/build.py": "helper_text: the package's own .py files, sent to a target",
    "runtimes/cpython/runner.py": "a target module's __file__ (in the target), no package file",
    "runtimes/cpython/imports.py": "a target module's __file__, read from its memory, no package file",
}
RUNTIME_FILES = {
    "micropatch/py.typed": "PEP 561: the package is typed",
    "micropatch/bodies/micropatch.h": "bodies/cbody.py HEADER",
    "micropatch/demo/vulnerable.c": "demo/runner.py",
    "micropatch/server/migrations/env.py": "alembic, run by server/database.py migrate",
    "micropatch/server/migrations/script.py.mako": "alembic's template of a new revision",
    "micropatch/server/static/swagger/swagger-ui-bundle.js": "console/apidocs.py: /docs",
    "micropatch/server/static/swagger/swagger-ui.css": "console/apidocs.py: /docs",
    "micropatch/server/static/swagger/LICENSE": "swagger-ui-dist's licence (Apache-2.0)",
}
_OPENS = re.compile(r"__file__|importlib\.resources|from importlib import resources")


def _templates() -> set[str]:
    """Templates the console renders, and those they extend or include."""
    names = {
        name
        for page in (SRC / "server" / "console").glob("*.py")
        for name in re.findall(r'"(\w+\.html)"', page.read_text())
    }
    pending = set(names)
    while pending:
        text = (SRC / "server" / "templates" / pending.pop()).read_text()
        found = set(re.findall(r'{%\s*(?:extends|include)\s+"([\w.]+)"', text)) - names
        names |= found
        pending |= found
    return {f"micropatch/server/templates/{n}" for n in names}


def _static() -> set[str]:
    """Static files the templates link to, and the licence that goes with htmx."""
    names = {"htmx.LICENSE"}
    for template in (SRC / "server" / "templates").glob("*.html"):
        names |= set(re.findall(r"/static/([\w.-]+)", template.read_text()))
    return {f"micropatch/server/static/{n}" for n in names}


def _migrations() -> set[str]:
    versions = (SRC / "server" / "migrations" / "versions").glob("*.py")
    return {f"micropatch/server/migrations/versions/{p.name}" for p in versions}


def _tracked_data() -> set[str]:
    """Every file under src/micropatch that is not Python source or a build leftover."""
    return {
        "micropatch/" + p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names in the wheel: $MICROPATCH_TEST_WHEEL, or one built from a copy of the
    checkout (no stale build/ directory can add what the source lacks)."""
    given = os.environ.get(WHEEL_VARIABLE)
    if given:
        path = Path(given)
    else:
        tree = tmp_path_factory.mktemp("tree")
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(CHECKOUT / name, tree / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
        shutil.copytree(CHECKOUT / "src", tree / "src", ignore=ignore)
        out = tmp_path_factory.mktemp("wheel")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        [path] = out.glob("micropatch-*.whl")
    with zipfile.ZipFile(path) as z:
        return set(z.namelist())


def test_the_modules_that_open_package_files_are_known() -> None:
    opening = {
        p.relative_to(SRC).as_posix()
        for p in SRC.rglob("*.py")
        if _OPENS.search(p.read_text(encoding="utf-8"))
        and p.relative_to(SRC).as_posix() != "server/migrations/env.py"
    }
    assert opening == set(OPENERS), (
        "a module opens files of the package: list it in OPENERS and its files in "
        f"RUNTIME_FILES (new: {opening - set(OPENERS)}, gone: {set(OPENERS) - opening})"
    )


def test_every_runtime_file_is_in_the_wheel(wheel: set[str]) -> None:
    wanted = set(RUNTIME_FILES) | _templates() | _static() | _migrations()
    assert len(_templates()) > 5 and len(_static()) >= 3 and _migrations()
    for name in wanted:
        assert (CHECKOUT / "src" / name).is_file(), f"{name}: listed, not in the source"
    missing = sorted(wanted - wheel)
    assert not missing, f"the wheel lacks {missing}: add them to package-data in pyproject.toml"


def test_every_data_file_of_the_source_is_in_the_wheel(wheel: set[str]) -> None:
    missing = sorted(_tracked_data() - wheel)
    assert not missing, f"the wheel lacks {missing}: add them to package-data in pyproject.toml"


def test_every_module_is_in_the_wheel(wheel: set[str]) -> None:
    """A directory without __init__.py is still packaged (namespace packages)."""
    modules = {"micropatch/" + p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")}
    assert not sorted(modules - wheel)


@pytest.mark.skipif(not os.environ.get(INSTALLED_VARIABLE), reason="run by .ci/run's wheel job")
def test_the_installed_package_is_the_one_tested() -> None:
    """The wheel job imports the installed micropatch, in the tests and in the
    `micropatch` command they run, never the checkout's src/."""
    here = Path(micropatch.__file__).resolve()
    assert CHECKOUT not in here.parents, f"the tests import {here}, not the installed package"
    assert "site-packages" in here.parts
    command = shutil.which("micropatch")
    assert command is not None
    interpreter = Path(command).read_text().splitlines()[0].removeprefix("#!")
    shown = subprocess.run(
        [interpreter, "-c", "import micropatch; print(micropatch.__file__)"],
        capture_output=True, text=True, timeout=60, check=True, cwd="/",
    )  # fmt: skip
    assert Path(shown.stdout.strip()).resolve() == here, f"{command} runs {shown.stdout}"
    header = here.parent / "bodies" / "micropatch.h"
    assert header.is_file()
