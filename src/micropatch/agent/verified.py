"""The store's signatures checked once per pass, not once per process.

Before it applies or updates a stored patch the agent checks the artifact's
signatures again against the keys trusted now (`ArtifactStore.recheck`): a key
removed from the trust directory, or expired, stops its patches from being
applied anywhere new. The answer is the same for every process of a pass (the
artifact and the keys are), and an Ed25519 verification with a look at the trust
directory, per process, was a part of each apply's cost in a pass over hundreds
of processes for no new answer. A pass therefore checks each patch once, at its
first use, and every process of the pass gets that answer; the next pass (a policy
or store change, SIGHUP, `rescan_interval`) checks again.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from micropatch.errors import ArtifactError, SignatureError

if TYPE_CHECKING:
    from micropatch.agent.store import ArtifactStore
    from micropatch.trust.admission import Admitted


class PassVerified:
    """`recheck` of each stored patch once for one pass, shared by its workers."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._done: dict[str, Admitted | None] = {}

    def admitted(self, patch_id: str) -> Admitted | None:
        """The stored patch, checked against the keys trusted at its first use in the
        pass; None if that check rejected it (the store moved it aside and reported
        it, once). Any other error (the patch left the store) is raised, not kept."""
        # Held across the check: two workers meeting the same patch at once wait for
        # one verification, and a rejection happens (and is reported) once.
        with self._lock:
            if patch_id in self._done:
                return self._done[patch_id]
            try:
                admitted: Admitted | None = self.store.recheck(patch_id)
            except (SignatureError, ArtifactError):
                admitted = None
            self._done[patch_id] = admitted
            return admitted
