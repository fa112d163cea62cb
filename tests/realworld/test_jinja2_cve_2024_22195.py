"""CVE-2024-22195 and CVE-2024-34064 in Jinja2 3.1.2, fixed live by
patches/jinja2-CVE-2024-22195 (a CPython patch: docs/python-patches.md).

Jinja2's `xmlattr` filter writes a dict as HTML attributes; 3.1.2 escapes the
values but not the keys, so a key with a space, '/', '>' or '=' injects
attributes (`{"onclick=alert(1) x": "y"}` renders ` onclick=alert(1) x="y"`).
3.1.4 raises ValueError for such keys. The PoC is the advisory's
(GHSA-h5c8-rqwp-cp95, GHSA-h75v-3vvj-5mfj). A long-running renderer on
3.1.2, patched live, answers like 3.1.4; removed, like 3.1.2 again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch.runtimes.cpython import engine, states
from micropatch.runtimes.cpython.build import build
from micropatch.trust.admission import AdmittedPython, admit_any

from .venvs import site_packages, venv_python

pytestmark = [
    pytest.mark.realworld,
    pytest.mark.skipif(
        sys.version_info[:2] != (3, 11) or sys.platform != "linux",
        reason="the patch is built for CPython 3.11 (the venvs use the test's interpreter)",
    ),
]

PATCH = Path(__file__).resolve().parents[2] / "patches" / "jinja2-CVE-2024-22195" / "patch.toml"
POC = '{{ {"onclick=alert(1) x": "y"} | xmlattr }}'
POC_SLASH = '{{ {"a/b": "y"} | xmlattr }}'
NORMAL = [
    '{{ {"class": "a", "id": "b<c"} | xmlattr }}',
    '<ul{{ {"class": "my_list", "missing": none, "id": "list-42"} | xmlattr(false) }}>',
    "{{ 6 * 7 }} {{ 'x' | upper }}",
]
RENDERER = """
import json, sys
import jinja2
env = jinja2.Environment(autoescape=True)
print("ready", flush=True)
for line in sys.stdin:
    try:
        out = env.from_string(json.loads(line)).render()
    except Exception as e:
        out = "ERR %s: %s" % (type(e).__name__, e)
    print(json.dumps(out), flush=True)
"""


class Renderer:
    def __init__(self, python: Path) -> None:
        self.proc = subprocess.Popen([str(python), "-c", RENDERER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def render(self, template: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(template) + "\n")
        self.proc.stdin.flush()
        answer: str = json.loads(self.proc.stdout.readline())
        return answer


@pytest.fixture
def renderers() -> Iterator[tuple[Renderer, Renderer, Path]]:
    vulnerable_python = venv_python("jinja2==3.1.2", "markupsafe==2.1.5")
    fixed_python = venv_python("jinja2==3.1.4", "markupsafe==2.1.5")
    vulnerable, fixed = Renderer(vulnerable_python), Renderer(fixed_python)
    yield vulnerable, fixed, site_packages(vulnerable_python) / "jinja2" / "filters.py"
    for r in (vulnerable, fixed):
        r.proc.kill()
        r.proc.wait()


def _patch(module: Path, tmp_path: Path) -> AdmittedPython:
    built = build(PATCH, module, python=sys.executable)
    admitted = admit_any(built.to_bytes(), name=built.file_name, keys=None, allow_unsigned=True)
    assert isinstance(admitted, AdmittedPython)
    return admitted


def test_patched_renderer_answers_like_the_fixed_release(
    renderers: tuple[Renderer, Renderer, Path], tmp_path: Path
) -> None:
    vulnerable, fixed, module = renderers
    before = [vulnerable.render(t) for t in NORMAL]
    assert vulnerable.render(POC) == ' onclick=alert(1) x="y"'  # the injection
    assert fixed.render(POC).startswith("ERR ValueError: Invalid character in attribute name")

    outcome = engine.apply(_patch(module, tmp_path), vulnerable.pid)
    assert outcome.action == "applied"
    for poc in (POC, POC_SLASH):
        assert vulnerable.render(poc) == fixed.render(poc)
    assert [vulnerable.render(t) for t in NORMAL] == before == [fixed.render(t) for t in NORMAL]
    [state] = states.status(vulnerable.pid)
    assert state.patch_id == "jinja2-xmlattr-keys"

    engine.remove("jinja2-xmlattr-keys", vulnerable.pid)
    assert vulnerable.render(POC) == ' onclick=alert(1) x="y"'
    assert [vulnerable.render(t) for t in NORMAL] == before
