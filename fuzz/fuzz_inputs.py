"""atheris fuzz targets: the patch source parser and the artifact loader.

Whatever bytes come in, the only exceptions allowed out are MicropatchError
subclasses (with a message). Run one target for a while:

    python fuzz/fuzz_inputs.py source -atheris_runs=200000
    python fuzz/fuzz_inputs.py artifact -max_total_time=60

Anything else escaping is a crash atheris reports with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from micropatch.errors import MicropatchError
    from micropatch.patch.source import parse_patch
    from micropatch.trust import artifact

SEED_SOURCE = b"""[patch]
id = "seed"
version = 1
[target]
module = "libfoo.so"
build_id = "ab12"
[[patchlet]]
at = "parse+0x12"
expect = "48 89 e5"
code = "cmp esi, 64\\njg {parse+0x40}"
"""


def fuzz_source(data: bytes) -> None:
    try:
        parse_patch(data, "fuzz.toml")
    except MicropatchError as e:
        assert str(e), "an error without a message"


def fuzz_artifact(data: bytes) -> None:
    try:
        loaded = artifact.loads(data, "fuzz.mpatch")
        artifact.patch_of(loaded)
    except MicropatchError as e:
        assert str(e), "an error without a message"


TARGETS = {"source": fuzz_source, "artifact": fuzz_artifact}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
