"""Build an artifact: a patch compiled and verified against its module file.

`build` compiles every patchlet of a source against the module file, with no
process involved, and records what it proved: the module's identity, and per
patchlet its module offset, the site's length and original bytes, whether
the trampoline steps over the red zone, and the compiled C code. The format
itself is `micropatch.trust.artifact`'s.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from micropatch import __version__
from micropatch.arch.x86_64.template import TrampolineTemplate
from micropatch.bodies.toolchain import Toolchain
from micropatch.build.modulefile import check_identity, elsewhere, open_module, placeholder_cave
from micropatch.build.plan import ModuleView, PlannedSite, plan_module
from micropatch.build.precompute import templates
from micropatch.errors import ArtifactError, MicropatchError, ModuleError
from micropatch.files import read_bounded
from micropatch.patch.model import Patch
from micropatch.patch.source import MAX_SOURCE, parse_patch
from micropatch.trust.artifact import Artifact, make
from micropatch.trust.envelope import FORMAT
from micropatch.trust.keys import format_time, utc_now
from micropatch.trust.payload import (
    BuilderFacts,
    FieldFacts,
    ModuleFacts,
    PatchFacts,
    Payload,
    SiteFacts,
    TrampolineFacts,
    format_version,
)
from micropatch.trust.recorded import full_expect


def build(
    source: str | Path,
    module_file: str | Path,
    *,
    toolchain: Toolchain | None = None,
    now: datetime.datetime | None = None,
) -> Artifact:
    """Compile and verify every patchlet of the source against the module file;
    the unsigned artifact (sign it with `Artifact.signed`). `toolchain`
    compiles the bodies (default: a new one with $CC or `cc`).

    Raises what the checks raise (PatchFormatError, ElfError, ModuleMismatch,
    SiteError, AssemblyError, ...), each naming the patchlet and the problem.
    """
    source = Path(source)
    try:
        data = read_bounded(source, MAX_SOURCE)
    except OSError as exc:
        raise ArtifactError(f"{source}: cannot read patch source: {exc.strerror}") from None
    patch = parse_patch(data, str(source))
    text = data.decode("utf-8")  # parse_patch refused anything else
    toolchain = toolchain or Toolchain()
    toolchain.check(patch)
    module = open_module(module_file)
    check_identity(patch, module, str(source))
    _check_name(patch, Path(module_file), module)
    plan = plan_module(patch, module, toolchain, elsewhere)
    planned = plan.at(module, toolchain, elsewhere)
    cave = placeholder_cave(module)
    for p in planned:
        _check_trampoline(patch, p, cave)
    precomputed = templates(plan, module, toolchain)
    sites = [
        _facts(toolchain, patch, p, module, t) for p, t in zip(planned, precomputed, strict=True)
    ]
    filled = patch.model_copy(
        update={
            "patchlets": tuple(
                pl.model_copy(update={"expect": full_expect(pl.expect, s.original_bytes)})
                for pl, s in zip(patch.patchlets, sites, strict=True)
            )
        }
    )
    moment = now or _build_time()
    payload = Payload(
        format=FORMAT,
        format_version=format_version(sites),
        patch=PatchFacts(
            id=patch.id,
            version=patch.version,
            title=patch.info.title,
            source_name=source.name,
            source=text,
            model=filled.model_dump(mode="json", by_alias=True),
        ),
        module=ModuleFacts(
            name=patch.target.module,
            file=module.name,  # the file itself, symbolic links resolved
            build_id=module.identity.build_id,
            sha256=module.identity.sha256,
            pie=module.image.is_pie_or_shared,
        ),
        sites=sites,
        builder=BuilderFacts(name="micropatch", version=__version__, built_at=format_time(moment)),
    )
    return make(payload, str(source))


def _check_name(patch: Patch, given: Path, module: ModuleView) -> None:
    """Refuse a module file whose name is not the patch's `[target] module`.

    Processes map the file itself (a symbolic link resolved), and a patch matches
    a mapped module by that file's name, at run time as here: a library's
    DT_SONAME (`libfoo.so.1`, the loader's name for it, usually a link to
    `libfoo.so.1.2.3`) or the name of a link would match no process.
    """
    real = given.resolve()
    wanted = patch.target.module
    if real.name == wanted:
        return
    fix = f'set [target] module = "{real.name}"'
    if given.name == wanted:
        raise ModuleError(
            f"{given} is a symbolic link to {real}: processes that run it map "
            f"{real.name}, never {wanted}, so a patch for module {wanted!r} would match none; "
            f"{fix} and build against {real}",
            module=wanted,
        )
    if module.image.soname == wanted:
        raise ModuleError(
            f"[target] module = {wanted!r} is the DT_SONAME of {given}, the name the loader "
            f"looks it up by, but processes map the file itself, {real.name}, and a patch "
            f"matches the mapped file's name, so it would match none; {fix}",
            module=wanted,
        )
    raise ModuleError(
        f"[target] module = {wanted!r}, but the module file {given} is {real.name}: a patch "
        f"matches the mapped file's name, so it would match no process that maps this "
        f"file; {fix}, or build against the file named {wanted}",
        module=wanted,
    )


def _build_time() -> datetime.datetime:
    # Reproducible builds: the same inputs and SOURCE_DATE_EPOCH give the same id.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
    return utc_now()


def _check_trampoline(patch: Patch, planned: PlannedSite, cave: int) -> None:
    """Build the trampoline once at a placeholder: relocating the displaced
    instructions must work before any process sees the patch."""
    try:
        planned.trampoline(cave, cave)  # a stand-in counter: the engine places the real one
    except MicropatchError as exc:
        exc.within(f"patch {patch.id}, {planned.where}: ", patch_id=patch.id)
        raise


def _facts(
    toolchain: Toolchain,
    patch: Patch,
    planned: PlannedSite,
    module: ModuleView,
    template: TrampolineTemplate | None,
) -> SiteFacts:
    patchlet = patch.patchlets[planned.index]
    compiled = toolchain.compile_c(patchlet.c) if patchlet.c is not None else None
    return SiteFacts(
        patchlet=planned.index,
        at=patchlet.at,
        offset=planned.site.address - module.base,
        length=planned.site.length,
        original=planned.site.original.hex(),
        resume=None if planned.resume is None else planned.resume - module.base,
        skip_red_zone=planned.skip_red_zone,
        c_code=compiled.text.hex() if compiled else None,
        c_entry=compiled.entry if compiled else None,
        trampoline=None if template is None else _trampoline(template),
    )


def _trampoline(template: TrampolineTemplate) -> TrampolineFacts:
    return TrampolineFacts(
        code=template.code.hex(),
        fields=[FieldFacts(**f._asdict()) for f in template.fields],
        body=list(template.body),
        copies=list(template.copies),
        starts=list(template.starts),
    )
