"""errors.py: every error crosses the agent's socket as data and comes back as the
class that was raised, with its message and fields."""

from __future__ import annotations

import json

import pytest

from micropatch import errors
from micropatch.errors import (
    ERRORS,
    AgentError,
    Busy,
    Downgrade,
    MicropatchError,
    NotApplied,
    PatchFormatError,
    ProcessExited,
    from_wire,
    to_wire,
)


def _through_json(e: MicropatchError) -> MicropatchError:
    return from_wire(json.loads(json.dumps(to_wire(e))))


@pytest.mark.parametrize("cls", sorted(ERRORS.values(), key=lambda c: c.__name__))
def test_every_error_class_comes_back_as_itself(cls):
    e = cls.__new__(cls)
    MicropatchError.__init__(e, f"{cls.__name__} [rsp+0x10]", pid=7, patch_id="fix", offset=16)
    back = _through_json(e)
    assert type(back) is cls
    assert (back.message, back.pid, back.patch_id, back.module, back.offset) == (
        f"{cls.__name__} [rsp+0x10]",
        7,
        "fix",
        None,
        16,
    )


def test_the_registry_holds_every_class_of_the_module():
    defined = {
        name for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, MicropatchError)
    }  # fmt: skip
    assert set(ERRORS) == defined


def test_extra_fields_cross_too():
    back = _through_json(Busy("held", holder=4242, pid=12))
    assert isinstance(back, Busy) and back.holder == 4242 and back.pid == 12
    assert to_wire(Busy("held", holder=4242))["holder"] == 4242


def test_a_subclass_keeps_its_bases():
    back = _through_json(Downgrade("older", pid=3))
    assert isinstance(back, Downgrade)
    # the classification a client makes is by class, not by name
    assert isinstance(back, errors.AlreadyApplied)


def test_a_class_the_reader_does_not_know_becomes_its_nearest_known_base():
    class GuardLikeError(PatchFormatError):
        """Defined outside errors.py, as patch.guard.GuardError is."""

    back = _through_json(GuardLikeError("bad guard", patch_id="fix"))
    assert type(back) is PatchFormatError
    assert back.message == "bad guard" and back.patch_id == "fix"


def test_unknown_or_malformed_data_becomes_an_agent_error():
    assert type(from_wire({"error": "NoSuchError", "message": "?"})) is AgentError
    assert type(from_wire({})) is AgentError
    odd = from_wire({"error": 3, "kinds": [None, "ProcessExited"], "message": "gone"})
    assert type(odd) is ProcessExited and odd.message == "gone"


def test_fields_stay_as_they_were_for_events():
    assert NotApplied("no", pid=1).fields() == {"error": "NotApplied", "message": "no", "pid": 1}
