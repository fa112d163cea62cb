"""The fleet server: the TUF repository, storage, the API (docs/server.md).

Never touches a process and never runs a compiler or an assembler: artifacts
are checked with `trust.artifact` only. Import the submodule you need.
"""
