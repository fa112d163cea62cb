"""Policy inheritance down the group tree, each decision explained."""

from __future__ import annotations

import pytest

from micropatch.errors import ServerError
from micropatch.server.policy import (
    FALLBACK,
    Exclusion,
    GroupPolicy,
    ancestors,
    effective,
    normalise_path,
)


def test_paths() -> None:
    assert normalise_path("") == "/"
    assert normalise_path("/prod/web/") == "/prod/web"
    assert normalise_path("prod") == "/prod"
    assert ancestors("/prod/web") == ["/", "/prod", "/prod/web"]
    assert ancestors("/") == ["/"]
    for bad in ("/a//b", "/../x", "/a b", "/-x"):
        with pytest.raises(ServerError, match="segment"):
            normalise_path(bad)


ROOT = GroupPolicy("/", default_state="enabled")
PROD = GroupPolicy(
    "/prod",
    patches={"fix-a": "disabled", "fix-b": "enabled"},
    exclusions=(Exclusion("exe", "/usr/bin/java*"),),
)
WEB = GroupPolicy(
    "/prod/web",
    default_state="disabled",
    patches={"fix-a": "enabled"},
    exclusions=(Exclusion("unit", "nginx.service", "fix-b"),),
)


def test_nearest_group_decides_a_patch() -> None:
    web = effective([ROOT, PROD, WEB])
    assert web.state("fix-a").state == "enabled"
    assert web.state("fix-a").decided_by == "/prod/web"  # overrides /prod's "disabled"
    assert web.state("fix-b").state == "enabled"
    assert web.state("fix-b").decided_by == "/prod"  # inherited
    prod = effective([ROOT, PROD])
    assert (prod.state("fix-a").state, prod.state("fix-a").decided_by) == ("disabled", "/prod")


def test_default_state_for_new_patches_is_inherited_and_overridable() -> None:
    assert effective([ROOT]).state("new").state == "enabled"
    prod = effective([ROOT, PROD]).state("new")
    assert (prod.state, prod.decided_by) == ("enabled", "/")
    assert "default state for new patches of group /" in prod.reason
    web = effective([ROOT, PROD, WEB]).state("new")
    assert (web.state, web.decided_by) == ("disabled", "/prod/web")


def test_no_default_anywhere_is_disabled() -> None:
    decision = effective([GroupPolicy("/")]).state("new")
    assert (decision.state, decision.decided_by) == (FALLBACK, None) == ("disabled", None)


def test_exclusions_accumulate_with_their_group() -> None:
    web = effective([ROOT, PROD, WEB])
    assert web.exclusions == (
        (Exclusion("exe", "/usr/bin/java*"), "/prod"),
        (Exclusion("unit", "nginx.service", "fix-b"), "/prod/web"),
    )
    assert effective([ROOT, PROD]).exclusions == ((Exclusion("exe", "/usr/bin/java*"), "/prod"),)


def test_explained() -> None:
    explained = effective([ROOT, PROD, WEB]).explain(["fix-c"])
    assert explained["group"] == "/prod/web"
    assert explained["default_state"] == {"state": "disabled", "decided_by": "/prod/web"}
    assert [(p["patch_id"], p["state"], p["decided_by"]) for p in explained["patches"]] == [
        ("fix-a", "enabled", "/prod/web"),
        ("fix-b", "enabled", "/prod"),
        ("fix-c", "disabled", "/prod/web"),
    ]
    assert explained["exclusions"][1] == {
        "kind": "unit", "value": "nginx.service", "patch_id": "fix-b", "decided_by": "/prod/web"
    }  # fmt: skip


def test_empty_chain() -> None:
    with pytest.raises(ServerError):
        effective([])
