"""The OpenAPI schema fuzzed with schemathesis: whatever a client sends, the server
answers with a 4xx or what the schema promises, never a server error."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from unit.server.conftest import Api

from micropatch.trust.keys import generate_key

# Built at collection: schemathesis reads the schema from the app to parametrize.
_DIR = Path(tempfile.mkdtemp(prefix="micropatch-fuzz-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
API = Api(_DIR / "data", generate_key("fuzz"))
API.enroll("fuzz-host")
schema = schemathesis.openapi.from_asgi("/openapi.json", API.app)


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case: schemathesis.Case) -> None:
    who = "fuzz-host" if case.path == "/api/v1/checkin" else "admin"
    case.call_and_validate(headers=API.auth(who), checks=[schemathesis.checks.not_a_server_error])
