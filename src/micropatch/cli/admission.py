"""The CLI's side of the admission policy: find the trusted keys, call
`trust.admit_file`, and tell the user what was verified or not."""

from __future__ import annotations

from pathlib import Path

from micropatch.cli.options import out, warn
from micropatch.errors import ArtifactError, SignatureError
from micropatch.trust.artifact import MAX_SIZE
from micropatch.trust.keys import trusted_keys
from micropatch.trust.policy import Admitted, AdmittedPython, admit, is_source


def load_for_apply(path: Path, trust: list[Path] | None, allow_unsigned: bool) -> Admitted:
    """The patch `apply`, `update` and `dev run` may give the engine."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read: {exc.strerror}") from exc
    keys = None
    if not is_source(data, str(path)):  # a source is refused, or admitted, without keys
        try:
            keys = trusted_keys(trust or ())
        except SignatureError:
            if not allow_unsigned:
                raise
    admitted = admit(data, name=str(path), keys=keys, allow_unsigned=allow_unsigned)
    report_admission(path, admitted)
    return admitted


def report_admission(path: Path, admitted: Admitted | AdmittedPython) -> None:
    """Say what was verified (or not) about a patch about to be applied."""
    if admitted.verification is not None and admitted.artifact is not None:
        p = admitted.artifact.payload
        signers = ", ".join(k.describe() for k in admitted.verification.signers)
        out.print(
            f"[green]✓[/] verified {path}: {p.patch.id} v{p.patch.version} for "
            f"{p.module.name}, signed by {signers}"
        )
    for warning in admitted.warnings:
        warn(warning)
