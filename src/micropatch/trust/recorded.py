"""The patch as an artifact records it, read without the model framework.

`build` stores the validated model of the source in the payload (`patch.model`)
next to the facts it proved (module identity, sites, original bytes, compiled
C code). Applying a verified artifact reads that record here, with the
standard library: what the planner and the engine read of a patch
(`patch.view`), checked for type and against the recorded facts, so that the
apply path loads neither pydantic nor the source parser. The server and the
author's tools validate the whole payload instead (`trust.artifact`), and
`trust.artifact.patch_of` parses the source again; both check the record
against the facts with `check_facts`.

The records are named tuples, not dataclasses: frozen dataclasses cost a
millisecond each to define, on the path of every apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from micropatch.arch.x86_64.template import Field, TrampolineTemplate
from micropatch.errors import ArtifactError
from micropatch.patch.view import BodyKind, body_kind, counts_blocked

if TYPE_CHECKING:
    from collections.abc import Sequence

    from micropatch.bodies.cbody import CompiledC
    from micropatch.patch.view import PatchView


class RecordedInfo(NamedTuple):
    id: str
    version: int
    title: str | None = None
    description: str | None = None
    cves: tuple[str, ...] = ()
    author: str | None = None


class RecordedTarget(NamedTuple):
    module: str
    build_id: str | None
    sha256: str | None
    arch: str = "x86_64"


class RecordedPatchlet(NamedTuple):
    at: str
    expect: bytes | None = None
    code: str | None = None
    when: str | None = None
    then: str | None = None
    c: str | None = None
    jumps: tuple[str, ...] = ()
    resume: str = "after"
    check_branches: bool = True

    @property
    def kind(self) -> BodyKind:
        return body_kind(self.when, self.c)

    @property
    def counts_blocked(self) -> bool:
        return counts_blocked(self.code, self.then, self.c)


class RecordedPatch(NamedTuple):
    info: RecordedInfo
    target: RecordedTarget
    patchlets: tuple[RecordedPatchlet, ...]
    # Where `build` placed each patchlet in the module it names: the plan, in module
    # offsets, that applying reuses (`build.plan.plan_recorded`).
    module: ModuleFact | None = None
    sites: tuple[SiteFact, ...] = ()

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def version(self) -> int:
        return self.info.version


class SiteFact(NamedTuple):
    """What `build` proved about one patchlet's site: what `check_facts` needs, and
    where the site is (module offsets), for the planner."""

    patchlet: int
    at: str
    original: bytes
    offset: int = 0
    resume: int | None = None  # None: after the site
    skip_red_zone: bool = False
    # The trampoline precomputed at build (`build.precompute`); None: lay it out.
    trampoline: TrampolineTemplate | None = None


class ModuleFact(NamedTuple):
    name: str
    build_id: str | None
    sha256: str


def full_expect(given: bytes | None, original: bytes) -> bytes | None:
    """The bytes to expect at a site: the site's original bytes, or the author's
    `expect` where it covers more (up to `resume`, say), which `build` checked
    against the module file; None if the two disagree where both speak."""
    if given is None:
        return original
    common = min(len(given), len(original))
    if given[:common] != original[:common]:
        return None
    return given if len(given) > len(original) else original


def check_facts(
    patch: PatchView, module: ModuleFact, sites: Sequence[SiteFact], name: str
) -> list[bytes]:
    """Check a patch read from an artifact against the facts recorded with it; the
    bytes each patchlet expects at its site (`full_expect`). ArtifactError if they
    disagree: the artifact is inconsistent."""

    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{name}: {problem}; the artifact is inconsistent, rebuild it")

    target = patch.target
    if target.module != module.name:
        raise bad(f"its source targets {target.module}, but it was built for {module.name}")
    if target.build_id is not None and target.build_id != module.build_id:
        raise bad(
            f"its source targets build-id {target.build_id}, but it was built against "
            f"build-id {module.build_id}"
        )
    if target.sha256 is not None and target.sha256 != module.sha256:
        raise bad(
            f"its source targets sha256 {target.sha256}, but it was built against {module.sha256}"
        )
    ordered = sorted(sites, key=lambda s: s.patchlet)
    if [s.patchlet for s in ordered] != list(range(len(patch.patchlets))):
        raise bad(
            f"its source has {len(patch.patchlets)} patchlets, but sites are recorded for "
            f"patchlets {[s.patchlet for s in ordered]}"
        )
    expects = []
    for site, patchlet in zip(ordered, patch.patchlets, strict=True):
        if site.at != patchlet.at:
            raise bad(
                f"patchlet[{site.patchlet}] is at {patchlet.at!r} in its source, but its site "
                f"was recorded for {site.at!r}"
            )
        expect = full_expect(patchlet.expect, site.original)
        if expect is None:
            assert patchlet.expect is not None
            raise bad(
                f"patchlet[{site.patchlet}] expects {patchlet.expect.hex(' ')}, but the site "
                f"recorded holds {site.original.hex(' ')}"
            )
        expects.append(expect)
    return expects


def recorded_patch(
    payload: dict[str, Any], name: str
) -> tuple[RecordedPatch, dict[str, CompiledC]]:
    """The patch an artifact's payload records, its expected bytes filled from the
    sites, and its compiled C bodies by source text. ArtifactError naming the field
    that is missing or of the wrong type, or what disagrees with the facts."""
    read = _Reader(name)
    facts = read.table(payload, "payload", "patch")
    model = read.table(facts, "payload.patch", "model")
    info_table = read.table(model, "payload.patch.model", "patch")
    target_table = read.table(model, "payload.patch.model", "target")
    module_table = read.table(payload, "payload", "module")
    info = RecordedInfo(
        read.value(info_table, "patch", "id", str),
        read.value(info_table, "patch", "version", int),
        read.value(info_table, "patch", "title", str, None),
        read.value(info_table, "patch", "description", str, None),
        tuple(read.strings(info_table, "patch", "cves")),
        read.value(info_table, "patch", "author", str, None),
    )
    if (info.id, info.version) != (read.value(facts, "payload.patch", "id", str),
                                   read.value(facts, "payload.patch", "version", int)):  # fmt: skip
        raise ArtifactError(
            f"{name}: its recorded model is patch {info.id} v{info.version}, but it is "
            f"labelled {facts['id']} v{facts['version']}; the artifact is inconsistent, rebuild it"
        )
    target = RecordedTarget(
        read.value(target_table, "target", "module", str),
        read.value(target_table, "target", "build_id", str, None),
        read.value(target_table, "target", "sha256", str, None),
        read.value(target_table, "target", "arch", str, "x86_64"),
    )
    patchlets = []
    for i, entry in enumerate(read.tables(model, "payload.patch.model", "patchlet")):
        where = f"patchlet[{i}]"
        expect = read.value(entry, where, "expect", str, None)
        patchlets.append(RecordedPatchlet(
            read.value(entry, where, "at", str),
            None if expect is None else read.hex(expect, f"{where}.expect"),
            read.value(entry, where, "code", str, None),
            read.value(entry, where, "when", str, None),
            read.value(entry, where, "then", str, None),
            read.value(entry, where, "c", str, None),
            tuple(read.strings(entry, where, "jumps")),
            read.value(entry, where, "resume", str, "after"),
            read.value(entry, where, "check_branches", bool, True),
        ))  # fmt: skip
    module = ModuleFact(
        read.value(module_table, "module", "name", str),
        read.value(module_table, "module", "build_id", str, None),
        read.value(module_table, "module", "sha256", str),
    )
    sites, compiled = [], {}
    for i, entry in enumerate(read.tables(payload, "payload", "sites")):
        where = f"sites[{i}]"
        index = read.value(entry, where, "patchlet", int)
        original = read.hex(read.value(entry, where, "original", str), f"{where}.original")
        resume = read.value(entry, where, "resume", int, None)
        skip_red_zone = read.value(entry, where, "skip_red_zone", bool)
        template = _template(read, entry, where, skip_red_zone)
        if template is not None:
            _check_template(read, template, original, resume, f"{where}.trampoline")
        sites.append(
            SiteFact(
                index,
                read.value(entry, where, "at", str),
                original,
                read.value(entry, where, "offset", int),
                resume,
                skip_red_zone,
                template,
            )
        )
        code = read.value(entry, where, "c_code", str, None)
        entry_offset = read.value(entry, where, "c_entry", int, None)
        if 0 <= index < len(patchlets) and code is not None and entry_offset is not None:
            source = patchlets[index].c
            if source is not None:
                from micropatch.bodies.cbody import CompiledC  # only for C bodies

                compiled[source] = CompiledC(read.hex(code, f"{where}.c_code"), entry_offset)
    patch = RecordedPatch(info, target, tuple(patchlets))
    expects = check_facts(patch, module, sites, name)
    filled = tuple(p._replace(expect=e) for p, e in zip(patchlets, expects, strict=True))
    return RecordedPatch(info, target, filled, module, tuple(sites)), compiled


_KINDS = ("rel8", "rel32", "imm32", "imm64")


def _template(
    read: _Reader, site: dict[str, Any], where: str, skip_red_zone: bool
) -> TrampolineTemplate | None:
    """A site's precomputed trampoline (`trust.payload.TrampolineFacts`), if recorded."""
    table = read.value(site, where, "trampoline", dict, None)
    if table is None:
        return None
    where = f"{where}.trampoline"
    code = read.hex(read.value(table, where, "code", str), f"{where}.code")
    fields = []
    for i, entry in enumerate(read.value(table, where, "fields", list)):
        at = f"{where}.fields[{i}]"
        if not isinstance(entry, dict):
            raise read.bad(at, "expected an object")
        field = Field(*(read.value(entry, at, key, kind) for key, kind in _FIELD_KEYS))
        if (
            field.width not in (4, 8)
            or not {field.address, field.counter, field.base} <= {-1, 0, 1}
            or field.kind not in _KINDS
            or not 0 <= field.addend < 1 << 64
            or not 0 <= field.offset <= len(code) - field.width
        ):
            raise read.bad(at, f"not a field of this {len(code)}-byte trampoline: {entry}")
        fields.append(field)
    body = tuple(read.ints(table, where, "body"))
    if len(body) != 2:
        raise read.bad(f"{where}.body", "expected [start, end]")
    return TrampolineTemplate(
        code,
        tuple(fields),
        (body[0], body[1]),
        tuple(read.ints(table, where, "copies")),
        skip_red_zone,
        tuple(read.ints(table, where, "starts")),
    )


def _check_template(
    read: _Reader, template: TrampolineTemplate, original: bytes, resume: int | None, where: str
) -> None:
    """What the engine relies on in a template, checked without a decoder: the displaced
    instructions start at the site and inside it, one relocated copy each (and the jump
    back) unless the patchlet resumes elsewhere, all within the trampoline."""
    starts, copies, (start, end) = template.starts, template.copies, template.body
    size = len(template.code)
    if (
        not starts
        or starts[0] != 0
        or list(starts) != sorted(set(starts))
        or starts[-1] >= len(original)
    ):
        raise read.bad(f"{where}.starts", f"{list(starts)} are not instructions of the site")
    expected = 0 if resume is not None else len(starts) + 1
    if (
        len(copies) != expected
        or list(copies) != sorted(set(copies))
        or any(c > size for c in copies)
    ):
        raise read.bad(f"{where}.copies", f"{list(copies)} do not match the site's instructions")
    if not 0 <= start <= end <= size:
        raise read.bad(f"{where}.body", f"[{start}, {end}] is not inside the trampoline")


_FIELD_KEYS = (("offset", int), ("width", int), ("address", int), ("counter", int),
               ("base", int), ("addend", int), ("kind", str))  # fmt: skip


class _Reader:
    """Typed lookups in parsed JSON, with messages that name the artifact and field."""

    _MISSING = object()

    def __init__(self, name: str) -> None:
        self.name = name

    def bad(self, where: str, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.name}: {where}: {problem}")

    def value(
        self, table: dict[str, Any], where: str, key: str, kind: type, default: Any = _MISSING
    ) -> Any:
        value = table.get(key, default)
        if value is self._MISSING:
            raise self.bad(f"{where}.{key}", "required field is missing")
        if value is None and default is None:
            return None
        # bool is an int in Python, and JSON true must not pass for a number
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.bad(f"{where}.{key}", f"expected {kind.__name__}, got {value!r}")
        return value

    def table(self, table: dict[str, Any], where: str, key: str) -> dict[str, Any]:
        return dict(self.value(table, where, key, dict))

    def tables(self, table: dict[str, Any], where: str, key: str) -> list[dict[str, Any]]:
        items = self.value(table, where, key, list)
        if not items or not all(isinstance(item, dict) for item in items):
            raise self.bad(f"{where}.{key}", "expected a non-empty list of objects")
        return items  # type: ignore[no-any-return]

    def strings(self, table: dict[str, Any], where: str, key: str) -> list[str]:
        items = self.value(table, where, key, list, [])
        if not all(isinstance(item, str) for item in items):
            raise self.bad(f"{where}.{key}", "expected a list of strings")
        return items  # type: ignore[no-any-return]

    def ints(self, table: dict[str, Any], where: str, key: str) -> list[int]:
        items = self.value(table, where, key, list)
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            raise self.bad(f"{where}.{key}", "expected a list of offsets")
        return items  # type: ignore[no-any-return]

    def hex(self, text: str, where: str) -> bytes:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise self.bad(where, f"{text!r} is not hex bytes") from None
