"""Checks made when a patch is built against its module file: reach of a direct
branch to another module, jumps into an overwritten site, the module's name."""

from __future__ import annotations

import shutil

import pytest

from micropatch.build.artifact import build
from micropatch.errors import AssemblyError, BranchIntoSite, MicropatchError, ModuleError

from .test_artifact import FIX, source, write_source


def test_direct_call_to_another_module_gets_the_reach_message(targets, tmp_path) -> None:
    text = source(targets.vuln_pie, [{"at": "copy_packet", "code": "call {libc.so.6!abort}"}])
    with pytest.raises(AssemblyError) as err:
        build(write_source(tmp_path, text), targets.vuln_pie)
    message = str(err.value)
    assert "{libc.so.6!abort} is beyond the +-2 GiB reach of a rel32 `call`" in message
    assert "`mov rax, {libc.so.6!abort}`, then `call rax`" in message
    assert "KS_ERR" not in message and "0x7ffff" not in message.lower()


def test_call_through_a_register_to_another_module_builds(targets, tmp_path) -> None:
    code = "push rax\nmov rax, {libc.so.6!abort}\ntest rdi, rdi\njnz ok\ncall rax\nok:\npop rax"
    text = source(targets.vuln_pie, [{"at": "copy_packet", "code": code}])
    build(write_source(tmp_path, text), targets.vuln_pie)


def test_no_message_shows_the_stand_in_address(targets, tmp_path) -> None:
    code = "mov eax, {libc.so.6!abort}"  # 32 bits: does not fit
    text = source(targets.vuln_pie, [{"at": "copy_packet", "code": code}])
    with pytest.raises(MicropatchError) as err:
        build(write_source(tmp_path, text), targets.vuln_pie)
    assert "{libc.so.6!abort} does not fit" in str(err.value)
    assert "0x7ffff" not in str(err.value).lower()


@pytest.mark.parametrize(
    ("patchlets", "culprit"),
    [
        # Its own site: copy_packet's first instruction is `test esi, esi` (2 bytes).
        ([{"at": "copy_packet", "code": "cmp esi, 64\njle ok\njmp {copy_packet+0x2}\nok:"}], 0),
        (
            [
                {"at": "copy_packet+0x8", "code": "nop"},
                {"at": "copy_packet", "code": "cmp esi, 64\njle ok\njmp {copy_packet+0x9}\nok:"},
            ],
            1,
        ),
    ],
    ids=["own-site", "another-site"],
)
def test_jump_into_an_overwritten_site_is_refused(targets, tmp_path, patchlets, culprit) -> None:
    text = source(targets.vuln_pie, patchlets)
    with pytest.raises(BranchIntoSite) as err:
        build(write_source(tmp_path, text), targets.vuln_pie)
    message = str(err.value)
    assert f"patchlet[{culprit}] ({patchlets[culprit]['at']})" in message
    assert "inside the site of patchlet[" in message and "which the jump overwrites" in message


def test_jump_to_a_site_start_or_past_its_end_builds(targets, tmp_path) -> None:
    code = "cmp esi, 64\njle ok\njmp {copy_packet}\nok:"
    text = source(targets.vuln_pie, [{"at": "copy_packet", "code": code}])
    build(write_source(tmp_path, text), targets.vuln_pie)


@pytest.fixture
def versioned(targets, tmp_path):
    """libvuln.so (DT_SONAME libvuln.so) installed as the loader's convention has it:
    the file libvuln.so.1.2.3, which processes map under that name."""
    path = tmp_path / "lib" / "libvuln.so.1.2.3"
    path.parent.mkdir()
    shutil.copyfile(targets.libvuln, path)
    return path


def test_module_named_by_its_file_builds(targets, tmp_path, versioned) -> None:
    text = source(versioned, [FIX], name="libvuln.so.1.2.3")
    assert build(write_source(tmp_path, text), versioned).payload.module.name == "libvuln.so.1.2.3"


def test_module_named_by_its_soname_is_refused(targets, tmp_path, versioned) -> None:
    text = source(versioned, [FIX], name="libvuln.so")
    with pytest.raises(ModuleError) as err:
        build(write_source(tmp_path, text), versioned)
    assert str(err.value).startswith("[target] module = 'libvuln.so' is the DT_SONAME of ")
    assert "processes map the file itself, libvuln.so.1.2.3" in str(err.value)
    assert str(err.value).endswith('set [target] module = "libvuln.so.1.2.3"')


def test_module_named_otherwise_is_refused(targets, tmp_path) -> None:
    text = source(targets.vuln_pie, [FIX], name="vuln")
    with pytest.raises(
        ModuleError,
        match=r"\[target\] module = 'vuln', but the module file .*vuln_pie is vuln_pie: .*set \[target\] module = \"vuln_pie\", or build against the file named vuln",
    ):
        build(write_source(tmp_path, text), targets.vuln_pie)
