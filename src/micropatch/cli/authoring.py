"""Authoring commands: build, sign, verify artifacts; generate keys.

Heavy imports (the assembler, the crypto, the models) happen inside each
command, so that other commands start fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from micropatch.cli.options import (
    TrustOption,
    escape,
    fail,
    key_text,
    out,
    short,
    table_console,
    warn,
)
from micropatch.errors import ArtifactError, MicropatchError

if TYPE_CHECKING:
    from micropatch.trust.keys import PrivateKey

# --- commands -----------------------------------------------------------------


def destination(output: str | None) -> Path | None:
    """Where `-o` says to write: a PATH ending in / is a directory, made if missing
    (a file is never written under the name of a directory meant)."""
    if output is None:
        return None
    path = Path(output)
    if output.endswith(("/", os.sep)) and not path.is_dir():
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise ArtifactError(f"cannot create the directory {output}: {e.strerror}") from None
    return path


def build(
    source: Annotated[Path, typer.Argument(help="Patch source (TOML).")],
    module: Annotated[
        Path, typer.Option("--module", "-m", help="The module file the patch targets.")
    ],
    key: Annotated[
        Path | None, typer.Option("--key", "-k", help="Private key (.key) to sign with.")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Output file, or directory (an existing one, or any PATH ending in /: created "
            "if missing). Default: the current directory.",
        ),
    ] = None,
    python: Annotated[
        str | None,
        typer.Option(
            "--python",
            help="CPython patches: the interpreter of the target's Python version to compile "
            "with (default: the one running micropatch).",
        ),
    ] = None,
) -> None:
    """Compile and verify a patch against its module file; write a signed artifact."""
    from micropatch.cli.pyauthoring import build_python, is_python

    if is_python(source):
        build_python(source, module, key, destination(output), python)
        return
    if python is not None:
        raise fail('--python is for CPython patches ([target] runtime = "cpython")')
    from rich.table import Table

    from micropatch.build.artifact import build as build_artifact
    from micropatch.trust import keys

    try:
        signer = keys.load_private_key(key) if key is not None else None
        built = build_artifact(source, module)
        if signer is not None:
            built = built.signed(signer)
        written = built.write(destination(output) or Path.cwd())
    except MicropatchError as e:
        raise fail(str(e)) from None
    p = built.payload
    if p.module.file != p.module.name:
        link = f" (a link to {module.resolve()})" if module.is_symlink() else ""
        warn(
            f"{module}{link} is named {p.module.file}, the patch targets {p.module.name}: only "
            "processes that map a file named "
            f"{p.module.name} (with this identity) can receive it; processes that run "
            f"{module} map {p.module.file}"
        )
    table = Table("patchlet", "at", "offset", "site", "original bytes", "red zone", "resume")
    for s in p.sites:
        table.add_row(
            str(s.patchlet), escape(s.at), f"{s.offset:#x}", f"{s.length} bytes",
            s.original_bytes.hex(" "), "stepped over" if s.skip_red_zone else "untouched",
            "after the site" if s.resume is None else f"{s.resume:#x}",
        )  # fmt: skip
    table_console().print(table)
    identity = f"build-id {p.module.build_id}" if p.module.build_id else "no build-id"
    out.print(
        f"[green]✓[/] built {p.patch.id} v{p.patch.version} for {escape(p.module.name)} "
        f"({identity}, sha256 {short(p.module.sha256)}): {escape(written)}",
        highlight=False,
    )
    say_signed(built.id, written, signer)


def say_signed(artifact_id: str, written: Path, signer: PrivateKey | None) -> None:
    """What `build` prints last for either runtime: the artifact's id, and who
    signed it or how to sign it."""
    out.print(f"  artifact id {artifact_id}", highlight=False)
    if signer is None:
        warn(
            f"{written} is not signed, so `micropatch apply` will refuse it: sign it with "
            f"`micropatch sign {written} --key KEY.key`"
        )
    else:
        out.print(f"  signed by {escape(key_text(signer.public))}", highlight=False)


def sign(
    artifact_file: Annotated[Path, typer.Argument(help="Artifact (.mpatch) to sign.")],
    key: Annotated[Path, typer.Option("--key", "-k", help="Private key (.key) to sign with.")],
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help="Write here instead of in place (a PATH ending in /: a directory, created if "
            "missing).",
        ),
    ] = None,
) -> None:
    """Add a signature to an artifact (its id, the hash of its content, does not change)."""
    from micropatch.trust import artifact, keys

    try:
        signer = keys.load_private_key(key)
        built = artifact.load_any(artifact_file)
        if isinstance(built, artifact.PythonArtifact):  # never sign what cannot be applied
            from micropatch.trust.pypayload import python_patch_of

            python_patch_of(built.payload, built.name)
        else:
            artifact.patch_of(built)
        written = built.signed(signer).write(destination(output) or artifact_file)
    except MicropatchError as e:
        raise fail(str(e)) from None
    out.print(
        f"[green]✓[/] signed {escape(written)} with {escape(key_text(signer.public))}",
        highlight=False,
    )


def verify(
    artifact_file: Annotated[Path, typer.Argument(help="Artifact (.mpatch) to verify.")],
    trust: TrustOption = None,
) -> None:
    """Check an artifact's content hash and its signature by a trusted, unexpired key."""
    from micropatch.trust import keys
    from micropatch.trust.admission import AdmittedPython, admit_any_file
    from micropatch.trust.artifact import patch_of

    try:
        # Everything apply checks (the id, a trusted signature, the recorded patch
        # against the recorded module identity and sites), and more: the whole payload
        # is valid, and the source parses and agrees with the facts too.
        verified = admit_any_file(artifact_file, keys=keys.trusted_keys(trust or ()))
        if isinstance(verified, AdmittedPython):
            from micropatch.cli.pyauthoring import show_verified

            show_verified(artifact_file, verified)
            return
        built, verification = verified.artifact, verified.verification
        assert built is not None and verification is not None  # admitted with keys
        patch_of(built)
    except MicropatchError as e:
        raise fail(str(e)) from None
    p = built.payload
    out.print(f"[green]✓[/] {escape(artifact_file)}: verified", highlight=False)
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
        expires = "never" if k.expires is None else keys.format_time(k.expires)
        rows.append(("signed by", f"{k.name} ({k.keyid}), expires {expires}, from {k.path}"))
    for key, value in rows:
        out.print(f"  {key:<12} {escape(value)}", highlight=False)
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
    from micropatch.trust import keys

    stem = Path(name)
    try:
        key = keys.generate_key(stem.name, expires_days=expires)
        private, public = keys.write_key_pair(key, stem, force=force)
    except MicropatchError as e:
        raise fail(str(e)) from None
    until = "never" if key.public.expires is None else keys.format_time(key.public.expires)
    out.print(f"[green]✓[/] generated {escape(key_text(key.public))}", highlight=False)
    for label, value in (
        ("private key", f"{private} (mode 0600: keep it on the signing machine)"),
        ("public key", f"{public} (for verifiers: --trust, or their trust directory)"),
        ("key id", key.public.keyid),
        ("expires", until),
    ):
        out.print(f"  {label:<12} {escape(value)}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the authoring commands to the `micropatch` app."""
    from micropatch.cli.inspect import inspect

    app.command()(build)
    app.command()(sign)
    app.command()(verify)
    app.command()(inspect)
    app.add_typer(keys_app, name="keys")
