"""agent/policy.py: the pure decisions."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from micropatch.agent.policy import (
    Exclusion,
    PolicyView,
    exclusion,
    matches,
    reasons_against,
    wants,
)
from micropatch.errors import SelectionError
from micropatch.process.select import ProcessInfo

NGINX = ProcessInfo(10, "/usr/sbin/nginx", 33, "/system.slice/nginx.service", "nginx.service")
SHELL = ProcessInfo(11, "/usr/bin/bash", 1000, "/user.slice/user-1000.slice", None)
ENABLED = {"fix-a": "enabled", "fix-b": "enabled", "fix-off": "disabled"}


def wanted(candidates: list[str], info: ProcessInfo, view: PolicyView) -> set[str]:
    return {patch_id for patch_id in candidates if wants(patch_id, info, view)}


def test_enabled_patches_are_wanted_and_disabled_or_unknown_ones_not():
    view = PolicyView(ENABLED)
    assert wanted(["fix-a", "fix-b", "fix-off", "unknown"], NGINX, view) == {"fix-a", "fix-b"}
    assert reasons_against("fix-off", NGINX, view) == ["disabled"]
    assert reasons_against("unknown", NGINX, view) == ["disabled"]


@pytest.mark.parametrize(
    ("rule", "nginx", "shell"),
    [
        (Exclusion("exe", "/usr/sbin/*"), True, False),
        (Exclusion("exe", "*/bash"), False, True),
        (Exclusion("unit", "nginx.service"), True, False),
        (Exclusion("unit", "*.service"), True, False),  # a process outside any unit: never
        (Exclusion("user", "1000"), False, True),
        (Exclusion("user", "33"), True, False),
    ],
)
def test_exclusions_match_exe_unit_and_user(rule, nginx, shell):
    assert (rule.matches(NGINX), rule.matches(SHELL)) == (nginx, shell)
    view = PolicyView(ENABLED, (rule,))
    assert wants("fix-a", NGINX, view) is not nginx
    assert wants("fix-a", SHELL, view) is not shell


def test_an_exclusion_for_one_patch_leaves_the_others():
    view = PolicyView(ENABLED, (Exclusion("exe", "/usr/sbin/nginx", "fix-a"),))
    assert wanted(["fix-a", "fix-b"], NGINX, view) == {"fix-b"}
    assert wanted(["fix-a", "fix-b"], SHELL, view) == {"fix-a", "fix-b"}
    assert reasons_against("fix-a", NGINX, view) == [
        "excluded (--exe /usr/sbin/nginx --patch fix-a)"
    ]


def test_auto_disable_is_per_executable():
    view = PolicyView(ENABLED, auto_disabled=frozenset({("fix-a", "/usr/sbin/nginx")}))
    assert not wants("fix-a", NGINX, view)
    assert wants("fix-a", SHELL, view) and wants("fix-b", NGINX, view)


def test_a_pin_wins_for_its_process():
    view = PolicyView(
        ENABLED,
        (Exclusion("exe", "*"),),
        pins={("fix-off", NGINX.pid): True, ("fix-a", SHELL.pid): False},
    )
    assert wants("fix-off", NGINX, view)  # applied by hand, though disabled and excluded
    assert not wants("fix-a", SHELL, view)  # removed by hand, though enabled
    assert not wants("fix-a", NGINX, view)  # no pin there: excluded


def test_exclusion_normalises_units_and_users():
    assert exclusion("unit", "nginx") == Exclusion("unit", "nginx.service")
    assert exclusion("unit", "web-*") == Exclusion("unit", "web-*")
    assert exclusion("user", "root", "fix-a") == Exclusion("user", "0", "fix-a")
    assert exclusion("user", "1234") == Exclusion("user", "1234")
    assert exclusion("exe", "/opt/*", "") == Exclusion("exe", "/opt/*")
    with pytest.raises(SelectionError, match="no such user"):
        exclusion("user", "no-such-user-here")
    with pytest.raises(SelectionError, match="unknown exclusion kind"):
        exclusion("cgroup", "/x")


@dataclass(frozen=True)
class Ident:
    build_id: str | None
    sha256: str


@dataclass(frozen=True)
class Tgt:
    build_id: str | None
    sha256: str | None


def test_matches_checks_every_identity_field_the_patch_gives():
    file = Ident("ab12", "ff" * 32)
    assert matches(Tgt("AB12", None), file)
    assert matches(Tgt(None, "FF" * 32), file)
    assert matches(Tgt("ab12", "ff" * 32), file)
    assert not matches(Tgt("ab13", None), file)
    assert not matches(Tgt("ab12", "00" * 32), file)
    assert not matches(Tgt("ab12", None), Ident(None, "ff" * 32))
    assert not matches(Tgt(None, None), file)  # a target without identity matches nothing
