"""Authoring commands: build, sign, verify, inspect artifacts; generate keys.

Also the one place the apply policy lives (`patch_for_apply`): `apply` and
`update` take a signed artifact, verified against trusted keys, or a TOML
source only with --allow-unsigned.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from iced_x86 import OpKind
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from micropatch import live
from micropatch.errors import MicropatchError, SignatureError
from micropatch.live.cave import read_caves
from micropatch.live.module import LoadedModule, find_module, symbol_address
from micropatch.live.registry import AppliedPatch
from micropatch.patch import artifact, signing
from micropatch.patch.artifact import Artifact
from micropatch.patch.model import Patch
from micropatch.patch.plan import ModuleView, PlannedSite, plan_patch
from micropatch.patch.source import load_patch
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.x86.decode import decode, format_instruction, near_branch_target
from micropatch.x86.trampoline import build_trampoline, site_jump

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

TrustOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--trust",
        help=(
            "Trusted public key file (.pub) or directory of them (repeatable). "
            f"Default: the *.pub files in ${signing.TRUST_DIR_VARIABLE} "
            f"({signing.DEFAULT_TRUST_DIR})."
        ),
    ),
]
AllowUnsignedOption = Annotated[
    bool,
    typer.Option(
        "--allow-unsigned",
        help="Development only: accept a TOML source, or an artifact without signatures.",
    ),
]


def fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(1)


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def _is_source(path: Path) -> bool:
    """A TOML source rather than an artifact: by suffix, else by content (an
    artifact is a JSON object; a TOML document cannot start with `{`)."""
    if path.suffix == ".toml":
        return True
    if path.suffix == artifact.SUFFIX:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False  # let the artifact loader say what is wrong with the file
    return not head.startswith(b"{")


# --- the apply policy ---------------------------------------------------------


def patch_for_apply(path: Path, trust: list[Path] | None, allow_unsigned: bool) -> Patch:
    """The patch `apply`/`update` may give the engine: from a verified artifact,
    or (with --allow-unsigned) from a TOML source as is."""
    if _is_source(path):
        if not allow_unsigned:
            raise SignatureError(
                f"{path} is a patch source, and only signed artifacts are applied: build and "
                f"sign it (micropatch build {path} --module MODULE_FILE --key KEY.key), then "
                "apply the .mpatch file; for development only, --allow-unsigned applies a "
                "source as is"
            )
        warn(f"applying the unsigned patch source {path} (--allow-unsigned: development only)")
        return load_patch(path)
    built = artifact.load(path)  # read once: the bytes verified are the bytes applied
    try:
        keys = signing.trusted_keys(trust or ())
    except SignatureError:
        if not allow_unsigned:
            raise
        keys = None
    if keys is None or (allow_unsigned and not built.signatures):
        warn(
            f"applying {path} without checking its signatures (--allow-unsigned: development only)"
        )
    else:
        verification = artifact.verify(built, keys)
        _print_verified(built, verification)
    # Parsed from the very bytes that were hashed and verified: what is applied is
    # what was signed, checked against the recorded module identity and sites.
    return artifact.patch_of(built)


def _print_verified(built: Artifact, verification: signing.Verification) -> None:
    signers = ", ".join(k.describe() for k in verification.signers)
    p = built.payload
    out.print(
        f"[green]✓[/] verified {built.name}: {p.patch.id} v{p.patch.version} for "
        f"{p.module.name}, signed by {signers}",
        highlight=False,
    )
    for note in verification.ignored:
        warn(f"{built.name}: ignored a signature: {note}")


# --- commands -----------------------------------------------------------------


def build(
    source: Annotated[Path, typer.Argument(help="Patch source (TOML).")],
    module: Annotated[
        Path, typer.Option("--module", "-m", help="The module file the patch targets.")
    ],
    key: Annotated[
        Path | None, typer.Option("--key", "-k", help="Private key (.key) to sign with.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Output file or directory (default: the current directory)."
        ),
    ] = None,
) -> None:
    """Compile and verify a patch against its module file; write a signed artifact."""
    try:
        signer = signing.load_private_key(key) if key is not None else None
        built = artifact.build(source, module)
        if signer is not None:
            built = built.signed(signer)
        written = built.write(output or Path.cwd())
    except MicropatchError as e:
        raise fail(str(e)) from None
    p = built.payload
    if p.module.file != p.module.name:
        warn(
            f"{module} is named {p.module.file}, the patch targets {p.module.name}: only "
            "processes that map a file named "
            f"{p.module.name} (with this identity) can receive it"
        )
    table = Table("patchlet", "at", "offset", "site", "original bytes", "red zone", "resume")
    for s in p.sites:
        table.add_row(
            str(s.patchlet), s.at, f"{s.offset:#x}", f"{s.length} bytes",
            s.original_bytes.hex(" "), "stepped over" if s.skip_red_zone else "untouched",
            "after the site" if s.resume is None else f"{s.resume:#x}",
        )  # fmt: skip
    out.print(table)
    identity = f"build-id {p.module.build_id}" if p.module.build_id else "no build-id"
    out.print(
        f"[green]✓[/] built {p.patch.id} v{p.patch.version} for {p.module.name} ({identity}, "
        f"sha256 {p.module.sha256[:16]}…): {written}",
        highlight=False,
    )
    out.print(f"  artifact id {built.id}", highlight=False)
    if signer is None:
        warn(
            f"{written} is not signed, so `micropatch apply` will refuse it: sign it with "
            f"`micropatch sign {written} --key KEY.key`"
        )
    else:
        out.print(f"  signed by {signer.public.describe()}", highlight=False)


def sign(
    artifact_file: Annotated[Path, typer.Argument(help="Artifact (.mpatch) to sign.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="Private key (.key) to sign with.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of in place.")
    ] = None,
) -> None:
    """Add a signature to an artifact (its id, the hash of its content, does not change)."""
    try:
        signer = signing.load_private_key(key)
        built = artifact.load(artifact_file)
        artifact.patch_of(built)  # never sign what cannot be applied
        written = built.signed(signer).write(output or artifact_file)
    except MicropatchError as e:
        raise fail(str(e)) from None
    out.print(f"[green]✓[/] signed {written} with {signer.public.describe()}", highlight=False)


def verify(
    artifact_file: Annotated[Path, typer.Argument(help="Artifact (.mpatch) to verify.")],
    trust: TrustOption = None,
) -> None:
    """Check an artifact's content hash and its signature by a trusted, unexpired key."""
    try:
        keys = signing.trusted_keys(trust or ())
        # Everything apply checks: the id, a trusted signature, and that the source
        # parses and agrees with the recorded module identity and sites.
        verified = artifact.open_verified(artifact_file, keys)
    except MicropatchError as e:
        raise fail(str(e)) from None
    built, verification = verified.artifact, verified.verification
    p = built.payload
    out.print(f"[green]✓[/] {artifact_file}: verified", highlight=False)
    title = f": {p.patch.title}" if p.patch.title else ""
    builder = p.builder
    rows = [
        ("artifact id", f"{built.id} (SHA-256 of the canonical payload)"),
        ("patch", f"{p.patch.id} v{p.patch.version}{title}"),
        ("module", p.module.name),
        ("build-id", p.module.build_id or "none"),
        ("sha256", p.module.sha256),
        ("sites", ", ".join(f"{s.at} ({s.offset:#x}, {s.length} bytes)" for s in p.sites)),
        ("built", f"{builder.built_at} by micropatch {builder.version} from {p.patch.source_name}"),
    ]
    for k in verification.signers:
        expires = "never" if k.expires is None else signing.format_time(k.expires)
        rows.append(("signed by", f"{k.name} ({k.keyid}), expires {expires}, from {k.path}"))
    for key, value in rows:
        out.print(f"  {key:<12} {value}", highlight=False)
    for note in verification.ignored:
        warn(f"ignored a signature: {note}")


keys_app = typer.Typer(help="Manage signing keys.", no_args_is_help=True)


@keys_app.command("generate")
def keys_generate(
    name: Annotated[
        str, typer.Argument(help="Key name; writes NAME.key (private) and NAME.pub (public).")
    ],
    expires: Annotated[
        int | None, typer.Option("--expires", help="Days until the key expires (default: never).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing key files.")] = False,
) -> None:
    """Generate an Ed25519 signing key pair."""
    stem = Path(name)
    try:
        key = signing.generate_key(stem.name, expires_days=expires)
        private, public = signing.write_key_pair(key, stem, force=force)
    except MicropatchError as e:
        raise fail(str(e)) from None
    until = "never" if key.public.expires is None else signing.format_time(key.public.expires)
    out.print(f"[green]✓[/] generated {key.public.describe()}", highlight=False)
    for label, value in (
        ("private key", f"{private} (mode 0600: keep it on the signing machine)"),
        ("public key", f"{public} (for verifiers: --trust, or their trust directory)"),
        ("key id", key.public.keyid),
        ("expires", until),
    ):
        out.print(f"  {label:<12} {value}", highlight=False)


# --- inspect ------------------------------------------------------------------


class _Symbols:
    """Module offset -> `symbol+0xN`, from the module file's symbol tables."""

    def __init__(self, path: str | None, image_base: int) -> None:
        self._symbols: list[tuple[int, int, str]] = []
        if path is None:
            return
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                for section_name in (".symtab", ".dynsym"):
                    section = elf.get_section_by_name(section_name)
                    if not isinstance(section, SymbolTableSection):
                        continue
                    for sym in section.iter_symbols():
                        kind = sym["st_info"]["type"]
                        if (
                            sym.name
                            and kind in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE")
                            and sym["st_shndx"] not in ("SHN_UNDEF", "SHN_ABS")
                        ):
                            offset = sym["st_value"] - image_base
                            self._symbols.append((offset, sym["st_size"], sym.name))
                    if self._symbols:
                        break  # .symtab has everything .dynsym has
        except Exception:  # names are a nicety: a malformed table shows raw offsets
            self._symbols = []

    def name(self, offset: int) -> str | None:
        best: tuple[int, int, str] | None = None
        for start, size, name in self._symbols:
            inside = start <= offset < start + size or (size == 0 and start == offset)
            if inside and (best is None or size < best[1]):
                best = (start, size, name)
        if best is None:
            return None
        delta = offset - best[0]
        return f"{best[2]}+{delta:#x}" if delta else best[2]


@dataclass
class _SiteView:
    title: str
    original: list[str]
    replacement: list[str]
    trampoline: list[str]


def _listing(
    code: bytes, address: int, label: Callable[[int], str], annotate: Callable[[int], str | None]
) -> list[str]:
    rows = []
    for ins in decode(code, address):
        raw = code[ins.ip - address : ins.ip - address + ins.len].hex()
        refs = []
        target = near_branch_target(ins)
        if target is not None:
            refs.append(target)
        if ins.is_ip_rel_memory_operand:
            refs.append(ins.ip_rel_memory_address)
        if ins.op_count >= 2 and ins.op1_kind == OpKind.IMMEDIATE64:
            refs.append(ins.immediate64)
        notes = [n for n in (annotate(r) for r in refs) if n]
        comment = f"  ; {', '.join(notes)}" if notes else ""
        rows.append((label(ins.ip), raw, format_instruction(ins) + comment))
    widths = [max((len(row[i]) for row in rows), default=0) for i in (0, 1)]
    return [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]


@dataclass
class _Context:
    module: ModuleView
    symbols: _Symbols

    def where(self, address: int) -> str | None:
        offset = address - self.module.base
        span = self.module.high - self.module.base
        if not 0 <= offset < span:
            return None
        return self.symbols.name(offset) or f"{self.module.name}+{offset:#x}"

    def annotator(self, trampoline: int, size: int) -> Callable[[int], str | None]:
        def annotate(address: int) -> str | None:
            if trampoline <= address < trampoline + size:
                return f"trampoline+{address - trampoline:#x}"
            return self.where(address)

        return annotate

    def site_label(self, address: int) -> str:
        return self.where(address) or f"{address:#x}"


def _view(
    ctx: _Context,
    planned: PlannedSite,
    original: bytes,
    replacement: bytes,
    trampoline: bytes,
    trampoline_at: int,
    title: str,
) -> _SiteView:
    site = planned.site
    annotate = ctx.annotator(trampoline_at, len(trampoline))
    return _SiteView(
        title,
        _listing(original, site.address, ctx.site_label, annotate),
        _listing(replacement, site.address, ctx.site_label, annotate),
        _listing(trampoline, trampoline_at, lambda a: f"+{a - trampoline_at:#05x}", annotate),
    )


def _planned_views(
    ctx: _Context,
    patch: Patch,
    planned: list[PlannedSite],
    cave: int,
    how: str,
    originals: dict[int, bytes] | None = None,
) -> list[_SiteView]:
    """Trampolines built at placeholder addresses: what would be written."""
    views = []
    at = cave
    for p in planned:
        code = build_trampoline(
            at,
            p.site,
            p.body_for(cave),  # a stand-in counter address
            resume=p.resume,
            skip_red_zone=p.skip_red_zone,
        )
        original = (originals or {}).get(p.index, p.site.original)
        views.append(
            _view(ctx, p, original, site_jump(p.site, at), code, at, _title(patch, p, how))
        )
        at += (len(code) + 15) // 16 * 16
    return views


def _title(patch: Patch, p: PlannedSite, how: str) -> str:
    resume = "after the site" if p.resume is None else f"at {p.resume:#x}"
    red_zone = "; steps over the red zone" if p.skip_red_zone else ""
    return (
        f"{patch.id} {p.where}: site {p.site.address:#x}, {p.site.length} bytes; resumes "
        f"{resume}{red_zone} [{how}]"
    )


def _load_any(path: Path) -> tuple[Patch, Artifact | None]:
    if _is_source(path):
        return load_patch(path), None
    built = artifact.load(path)
    return artifact.patch_of(built), built


def inspect(
    artifact_file: Annotated[Path, typer.Argument(help="Artifact (.mpatch) or patch source.")],
    module: Annotated[
        Path | None, typer.Option("--module", "-m", help="Show it against this module file.")
    ] = None,
    pid: Annotated[
        int | None, typer.Option("--pid", "-p", help="Show it in this running process.")
    ] = None,
) -> None:
    """Show each site: original instructions, the jump that replaces them, the trampoline."""
    if module is not None and pid is not None:
        raise fail("give --module FILE or --pid PID, not both")
    try:
        patch, built = _load_any(artifact_file)
        _print_header(patch, built)
        if module is not None:
            views = _file_views(patch, module)
        elif pid is not None:
            views = _process_views(patch, pid)
        else:
            _print_facts(built)
            return
    except MicropatchError as e:
        raise fail(str(e)) from None
    # Side by side needs room: when the output is not a terminal, do not squeeze it.
    console = out if out.is_terminal else Console(width=1000, soft_wrap=True)
    for view in views:
        console.print()
        console.print(Text(view.title, style="bold"))
        table = Table("original instructions", "replaced by", "trampoline", box=box.SIMPLE_HEAD)
        columns = (view.original, view.replacement, view.trampoline)
        table.add_row(*(Text("\n".join(lines)) for lines in columns))
        console.print(table)


def _print_header(patch: Patch, built: Artifact | None) -> None:
    out.print(
        f"patch {patch.id} v{patch.version}"
        + (f": {patch.info.title}" if patch.info.title else "")
        + f" — module {patch.target.module}",
        highlight=False,
    )
    if built is None:
        out.print("  source, not an artifact: nothing is verified or signed", highlight=False)
        return
    p = built.payload
    out.print(f"  artifact {built.id}", highlight=False)
    out.print(
        f"  built {p.builder.built_at} by micropatch {p.builder.version} against "
        f"{p.module.file} (build-id {p.module.build_id or 'none'}, sha256 {p.module.sha256})",
        highlight=False,
    )
    keyids = ", ".join(s.keyid[:16] + "…" for s in built.signatures) or "none"
    out.print(
        f"  signatures by key {keyids} (not checked here: `micropatch verify`)", highlight=False
    )


def _print_facts(built: Artifact | None) -> None:
    if built is None:
        raise MicropatchError("a patch source has no recorded sites: give --module or --pid")
    for s in built.payload.sites:
        code = s.original_bytes
        listing = _listing(code, s.offset, lambda a: f"{a:#x}", lambda _: None)
        out.print()
        out.print(
            Text(
                f"patchlet[{s.patchlet}] at {s.at}: module offset {s.offset:#x}, {s.length} "
                "bytes" + ("; steps over the red zone" if s.skip_red_zone else ""),
                style="bold",
            )
        )
        out.print("\n".join(listing), highlight=False)
    out.print("\n(give --module FILE or --pid PID to see the jumps and trampolines)")


def _file_views(patch: Patch, module_file: Path) -> list[_SiteView]:
    module = artifact.open_module(module_file)
    artifact.check_identity(patch, module, str(module_file))
    planned = plan_patch(patch, module)
    ctx = _Context(module, _Symbols(str(module_file), module.image.image_base))
    cave = artifact.placeholder_cave(module)
    where = (
        f"module at placeholder {module.base:#x}"
        if module.image.is_pie_or_shared
        else f"module at its own address {module.base:#x}"
    )
    how = f"from {module_file}, {where}, trampoline at placeholder {cave:#x}"
    return _planned_views(ctx, patch, planned, cave, how)


def _mapped_file(module: LoadedModule) -> str | None:
    for candidate in (
        f"/proc/{module.pid}/map_files/{module.mappings[0].map_files_entry}",
        f"/proc/{module.pid}/root{module.path}",
    ):
        if os.access(candidate, os.R_OK):
            return candidate
    return None


def _process_views(patch: Patch, pid: int) -> list[_SiteView]:
    mappings = read_maps(pid)
    module = find_module(pid, mappings, patch.target)
    planned = plan_patch(patch, module, lambda location: symbol_address(pid, mappings, location))
    ctx = _Context(module, _Symbols(_mapped_file(module), module.image.image_base))
    states = [s for s in live.status(pid) if s.patch_id == patch.id]
    with Memory(pid, writable=False) as memory:
        caves = read_caves(memory, mappings)
        applied: AppliedPatch | None = next(
            (p for c in caves for p in c.registry.patches if p.id == patch.id), None
        )
        if applied is not None and applied.version == patch.version:
            state = states[0] if states else None
            since = (
                datetime.datetime.fromtimestamp(state.applied_at).strftime("%Y-%m-%d %H:%M:%S")
                if state
                else "?"
            )
            blocked = state.blocked if state else None
            out.print(
                f"[green]applied[/] to process {pid} since {since}, cave at "
                f"{state.cave if state else 0:#x}"
                + ("" if blocked is None else f"; blocked exploit attempts: {blocked}"),
                highlight=False,
            )
            views = []
            by_index = {s.patchlet: s for s in applied.sites}
            for p in planned:
                s = by_index.get(p.index)
                if s is None:
                    raise MicropatchError(
                        f"process {pid}: the registry has no site for {p.where}; "
                        "the applied patch differs from this artifact"
                    )
                current = memory.read(s.address, len(s.jump))
                trampoline = memory.read(s.trampoline, s.trampoline_size)
                how = "in the process" + ("" if current == s.jump else "; SITE MODIFIED since")
                title = _title(patch, p, how)
                views.append(_view(ctx, p, s.original, current, trampoline, s.trampoline, title))
            return views
        if applied is not None:
            out.print(
                f"[yellow]not applied[/] to process {pid}: version {applied.version} of "
                f"{patch.id} is applied there (this is v{patch.version})",
                highlight=False,
            )
        else:
            out.print(f"[yellow]not applied[/] to process {pid}", highlight=False)
        originals = {}
        for p in planned:
            found = originals[p.index] = memory.read(p.site.address, p.site.length)
            if found != p.site.original:
                out.print(
                    f"[red]![/] {p.where}: process {pid} holds {found.hex(' ')} at "
                    f"{p.site.address:#x}, the module file {p.site.original.hex(' ')}",
                    highlight=False,
                )
    cave = artifact.placeholder_cave(module)
    how = f"read from process {pid}; jump and trampoline would be written, at placeholder {cave:#x}"
    return _planned_views(ctx, patch, planned, cave, how, originals)


def register(app: typer.Typer) -> None:
    """Add the authoring commands to the `micropatch` app."""
    app.command()(build)
    app.command()(sign)
    app.command()(verify)
    app.command()(inspect)
    app.add_typer(keys_app, name="keys")
