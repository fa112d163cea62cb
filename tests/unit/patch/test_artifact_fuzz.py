"""The artifact loader's robustness: whatever the input, only MicropatchError escapes."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropatch.errors import (
    ArtifactError,
    MicropatchError,
)
from micropatch.trust import artifact
from micropatch.trust.artifact import Artifact, loads, patch_of

from .artifacts import NOW, document_of, leaf_paths, resealed, set_at

# --- whatever the input, only MicropatchError escapes --------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)
_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_and_use(data: bytes) -> None:
    try:
        loaded = loads(data, "fuzz.mpatch")
        patch_of(loaded)
        artifact.verify(loaded, [], NOW)
    except MicropatchError:
        pass


@_settings
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    _load_and_use(data)


@_settings
@given(_json)
def test_random_json(value: Any) -> None:
    _load_and_use(json.dumps(value).encode())


@_settings
@given(_json)
def test_random_payload_with_a_matching_id(value: Any) -> None:
    try:
        data = resealed({"payload": value, "signatures": []})
    except (ArtifactError, TypeError, ValueError):
        return  # no canonical form: the loader refuses those before hashing
    _load_and_use(data)


@_settings
@given(data=st.data())
def test_mutated_artifacts(built: Artifact, data: st.DataObject) -> None:
    """One field of a real artifact replaced by anything, the id recomputed: the
    loader and the source check get past the hash and must still fail cleanly."""
    document = document_of(built)
    leaves = leaf_paths(document["payload"])
    path = data.draw(st.sampled_from(leaves))
    replacement = data.draw(_json | st.text(max_size=200))
    set_at(document["payload"], path, replacement)
    try:
        encoded = resealed(document)
    except ArtifactError:
        return
    _load_and_use(encoded)
