"""Fleet filters (process/select.py): /proc/PID/cgroup lines, units, globs, users."""

from __future__ import annotations

import os

import pytest

from micropatch.errors import ProcessNotFound, SelectionError
from micropatch.process.select import (
    Filters,
    ProcessInfo,
    cgroup_path,
    parse_user,
    read_info,
    unit_of,
    unit_pattern,
)

V1_HYBRID = """12:pids:/system.slice/nginx.service
11:memory:/system.slice/nginx.service
1:name=systemd:/system.slice/nginx.service
0::/system.slice/nginx.service
"""
V1_ONLY = """4:cpu,cpuacct:/system.slice/cron.service
1:name=systemd:/system.slice/cron.service
"""


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("0::/system.slice/nginx.service\n", "/system.slice/nginx.service"),
        (V1_HYBRID, "/system.slice/nginx.service"),
        (V1_ONLY, "/system.slice/cron.service"),
        ("0::/\n", "/"),
        ("3:cpu:/docker/abc\n", ""),  # v1 without the systemd hierarchy: no path we know
        ("", ""),
    ],
)
def test_cgroup_path(text: str, path: str) -> None:
    assert cgroup_path(text) == path


@pytest.mark.parametrize(
    ("path", "unit"),
    [
        ("/system.slice/nginx.service", "nginx.service"),
        ("/system.slice/docker-0123abcd.scope", "docker-0123abcd.scope"),
        ("/user.slice/user-1000.slice/session-4.scope", "session-4.scope"),
        (
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service",
            "app-foo.service",
        ),
        ("/system.slice/nginx.service/worker", "nginx.service"),  # a sub-cgroup of a unit
        ("/", None),
        ("/user.slice", None),
        ("", None),
    ],
)
def test_unit_of(path: str, unit: str | None) -> None:
    assert unit_of(path) == unit


def test_unit_names_as_systemctl_takes_them() -> None:
    assert unit_pattern("nginx") == "nginx.service"
    assert unit_pattern("nginx.service") == "nginx.service"
    assert unit_pattern("session-*.scope") == "session-*.scope"
    assert unit_pattern("php*") == "php*"


def _info(
    exe: str = "/usr/sbin/nginx", uid: int = 33, cgroup: str = "/system.slice/nginx.service"
) -> ProcessInfo:
    return ProcessInfo(1234, exe, uid, cgroup, unit_of(cgroup))


def test_no_filter_matches_everything() -> None:
    assert not Filters()
    assert Filters().matches(_info()) and Filters().matches(_info(exe=""))


def test_exe_globs_any_of_them() -> None:
    assert Filters.of(exe=["*/nginx"]).matches(_info())
    assert Filters.of(exe=["/usr/*"]).matches(_info())  # `*` crosses `/`
    assert Filters.of(exe=["*apache*", "*nginx*"]).matches(_info())
    assert not Filters.of(exe=["*apache*"]).matches(_info())
    assert not Filters.of(exe=["*NGINX*"]).matches(_info())  # case matters
    assert not Filters.of(exe=["*"]).matches(_info(exe=""))  # a kernel thread has none


def test_units_and_cgroups() -> None:
    assert Filters.of(units=["nginx"]).matches(_info())
    assert Filters.of(units=["ngin*"]).matches(_info())
    assert not Filters.of(units=["nginx.scope"]).matches(_info())
    assert not Filters.of(units=["nginx"]).matches(_info(cgroup="/user.slice"))
    assert Filters.of(cgroups=["/system.slice/*"]).matches(_info())
    assert not Filters.of(cgroups=["/user.slice/*"]).matches(_info())


def test_every_kind_given_must_match() -> None:
    both = Filters.of(exe=["*nginx"], users=["33"])
    assert both.matches(_info())
    assert not both.matches(_info(uid=0))
    assert not both.matches(_info(exe="/usr/bin/php"))


def test_users_by_name_or_uid() -> None:
    assert parse_user("0") == 0
    assert parse_user("root") == 0
    assert Filters.of(users=["root"]).matches(_info(uid=0))
    with pytest.raises(SelectionError, match="no-such-user-here: no such user"):
        parse_user("no-such-user-here")


def test_read_info_of_this_process() -> None:
    info = read_info(os.getpid())
    assert info.exe == os.path.realpath(f"/proc/{os.getpid()}/exe")
    assert info.uid == os.getuid()
    assert info.cgroup.startswith("/") or info.cgroup == ""
    with pytest.raises(ProcessNotFound):
        read_info(2**22 + 1)
