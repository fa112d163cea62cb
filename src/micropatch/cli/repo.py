"""`micropatch repo …`: the TUF repository patches are distributed from, its key
ceremony (offline), targets and timestamp."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from micropatch.cli.server_common import fail, server_extra

if TYPE_CHECKING:
    from micropatch.server.repository import Repository

repo_app = typer.Typer(
    help="The TUF repository patches are distributed from: key ceremony, targets, timestamp.",
    no_args_is_help=True,
    callback=server_extra,
)

RepoArgument = Annotated[Path, typer.Argument(help="The repository directory.")]
KeysOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--key",
        help="A targets (patch-signing) private key (.key), repeatable; default: the targets "
        "keys in DIR/online, if the repository publishes online.",
    ),
]


@repo_app.command("init")
def repo_init(
    directory: RepoArgument,
    offline_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the root keys (and a generated targets key) are written; move it off "
            "this machine afterwards. Default: DIR/offline-keys."
        ),
    ] = None,
    root_keys: Annotated[int, typer.Option(help="Number of root keys to generate.")] = 3,
    root_threshold: Annotated[
        int, typer.Option(help="Root signatures needed to change the root metadata.")
    ] = 2,
    targets_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--targets-key",
            help="A patch-signing private key (.key) to make a targets key, repeatable; "
            "default: generate one in the offline directory.",
        ),
    ] = None,
    targets_threshold: Annotated[int, typer.Option(help="Targets signatures needed.")] = 1,
    online_targets: Annotated[
        bool,
        typer.Option(
            "--online-targets",
            help="Also copy the targets keys into DIR/online, so the server publishes through "
            "its API (see docs/server.md for what this trades away).",
        ),
    ] = False,
    trust: Annotated[
        list[Path] | None,
        typer.Option(
            "--trust",
            help="A patch-signing public key (.pub): artifacts published to this repository "
            "must be signed by one of these; repeatable. Default: the targets keys.",
        ),
    ] = None,
    expires: Annotated[
        list[str] | None,
        typer.Option(help="ROLE=DAYS, how long a role's metadata stays valid; repeatable."),
    ] = None,
) -> None:
    """The key ceremony: create a repository, its root keys (offline), targets keys,
    and the online snapshot and timestamp keys."""
    from micropatch.errors import MicropatchError
    from micropatch.server.ceremony import init_repository
    from micropatch.server.tufkeys import load_keys, load_public

    expiry = {}
    for item in expires or []:
        role, _, days = item.partition("=")
        if not days.isdigit():
            raise fail(f"--expires {item!r}: expected ROLE=DAYS, e.g. timestamp=1")
        expiry[role] = int(days)
    try:
        done = init_repository(
            directory,
            offline_dir=offline_dir,
            root_keys=root_keys,
            root_threshold=root_threshold,
            targets_keys=load_keys(targets_key or []),
            targets_threshold=targets_threshold,
            online_targets=online_targets,
            trusted=[load_public(p) for p in trust or []],
            expiry=expiry,
        )
    except MicropatchError as e:
        raise fail(str(e)) from None
    print(f"repository: {done.repository}  (serve {done.repository / 'public'})")
    print(f"trusted root for clients: {done.repository / 'public/metadata/1.root.json'}")
    print(f"root keys ({root_threshold} of {root_keys}): " + ", ".join(map(str, done.root_keys)))
    print("targets keys: " + ", ".join(map(str, done.targets_keys)))
    print("online keys: " + ", ".join(map(str, done.online_keys)))
    print(
        f"Move {done.offline_dir} off this machine now (to offline media): the root keys "
        "must never be online."
    )


@repo_app.command("add-target")
def repo_add_target(
    directory: RepoArgument,
    artifact: Annotated[Path, typer.Argument(help="A signed artifact (.mpatch).")],
    key: KeysOption = None,
) -> None:
    """Publish a signed artifact: checked, then added to the targets metadata."""
    from micropatch.errors import MicropatchError
    from micropatch.server.artifacts import check, describe
    from micropatch.server.repository import Repository
    from micropatch.server.tufkeys import load_keys

    try:
        repo = Repository(directory)
        data = artifact.read_bytes()
        checked = check(data, str(artifact), repo.trusted_keys())
        keys = load_keys(key) if key else None
        _not_served(repo)
        repo.add_target(
            checked.file_name, data, custom={"micropatch": describe(checked)}, keys=keys
        )
    except OSError as e:
        raise fail(f"{artifact}: cannot read: {e.strerror}") from None
    except MicropatchError as e:
        raise fail(str(e)) from None
    print(f"published {checked.file_name}")


@repo_app.command("remove-target")
def repo_remove_target(
    directory: RepoArgument,
    name: Annotated[str, typer.Argument(help="The target name (see `micropatch repo list`).")],
    key: KeysOption = None,
) -> None:
    """Revoke a target: clients drop it at their next refresh, and agents remove it."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository
    from micropatch.server.tufkeys import load_keys

    try:
        repo = Repository(directory)
        _not_served(repo)
        repo.remove_target(name, keys=load_keys(key) if key else None)
    except MicropatchError as e:
        raise fail(str(e)) from None
    print(f"removed {name}")


def _not_served(repo: Repository) -> None:
    """A server's repository lists what its database says: refuse to change it here."""
    from micropatch.errors import RepositoryError

    database = repo.served_by()
    if database is not None:
        raise RepositoryError(
            f"{repo.dir} is the repository of a fleet server (database {database}): it lists "
            "what that database holds, and the server would undo this at its next start; "
            "publish with `micropatch publish` and revoke with POST "
            "/api/v1/patches/ID/revoke instead"
        )


@repo_app.command("refresh-timestamp")
def repo_refresh_timestamp(
    directory: RepoArgument,
    force: Annotated[bool, typer.Option(help="Re-sign even if not yet due.")] = False,
) -> None:
    """Re-sign the online roles (timestamp, snapshot; targets if its keys are online)
    whose metadata has less than half of its validity left. Run it from cron or a
    timer at least every half timestamp period; `server run` does it by itself."""
    from micropatch.errors import MicropatchError
    from micropatch.server.repository import Repository

    try:
        done = Repository(directory).refresh(force=force)
    except MicropatchError as e:
        raise fail(str(e)) from None
    print("re-signed: " + (", ".join(done) if done else "nothing (all fresh)"))


@repo_app.command("sign-root")
def repo_sign_root(
    directory: RepoArgument,
    root_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--root-key",
            help="A root private key (.key) of the current root, repeatable: a threshold of "
            "them must sign.",
        ),
    ] = None,
    expires_in: Annotated[
        int | None,
        typer.Option(help="Days the new root stays valid (default: the root period, 365)."),
    ] = None,
    new_root_keys: Annotated[
        int, typer.Option(help="Generate this many new root keys into --offline-dir.")
    ] = 0,
    root_threshold: Annotated[
        int | None,
        typer.Option(help="Root signatures needed from now on (default: unchanged)."),
    ] = None,
    offline_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where new root keys are written (offline media, not inside the repository)."
        ),
    ] = None,
    remove_root_key: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-root-key",
            help="A root key to drop (lost or exposed): its .pub file or key id; repeatable.",
        ),
    ] = None,
) -> None:
    """Renew or rotate the root: sign root version N+1 (new expiry; optionally new root
    keys and threshold, old ones removed) with a threshold of the current root keys. Run
    it on the offline machine, then copy N+1.root.json and root.json to where the
    repository is served."""
    from micropatch.errors import MicropatchError
    from micropatch.server.ceremony import sign_root
    from micropatch.server.repository import Repository
    from micropatch.server.tufkeys import load_keys

    if not root_key:
        raise fail("give the current root keys to sign with: --root-key ROOT.key (repeatable)")
    try:
        done = sign_root(
            Repository(directory),
            load_keys(root_key),
            expires_in=expires_in,
            new_root_keys=new_root_keys,
            root_threshold=root_threshold,
            offline_dir=offline_dir,
            remove_root_keys=remove_root_key or [],
        )
    except MicropatchError as e:
        raise fail(str(e)) from None
    print(f"root version {done.version}: {done.path}")
    print(f"expires {done.expires:%Y-%m-%d %H:%M} UTC")
    print(f"root keys: {done.threshold} of {len(done.root_keyids)} needed")
    if done.new_keys:
        print("new root keys: " + ", ".join(map(str, done.new_keys)))
        print(
            f"Move {done.offline_dir} off this machine now (to offline media): the root keys "
            "must never be online."
        )
    print(
        f"Copy {done.path.name} and root.json (only those) from {done.path.parent} into the "
        "served repository's public/metadata; agents follow from the root they trust."
    )


@repo_app.command("list")
def repo_list(directory: RepoArgument) -> None:
    """The published targets, one JSON object a line; each role's version and expiry
    (and a warning when the root expires soon) on stderr."""
    from micropatch.errors import MicropatchError
    from micropatch.server.expiry import root_expiry_warning
    from micropatch.server.repository import Repository

    try:
        repo = Repository(directory)
        roles = repo.roles()
        warning = root_expiry_warning(repo)
        targets = repo.target_files()
    except MicropatchError as e:
        raise fail(str(e)) from None
    for role, version, expires in roles:
        print(f"{role}: version {version}, expires {expires:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    for name, target in sorted(targets.items()):
        print(json.dumps({"name": name, "length": target.length, **target.custom}))
