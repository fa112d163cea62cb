"""Patchlet bodies (assembly, guards, C) compiled to machine code by a `Toolchain`.

Import the submodule you need (`bodies.toolchain`, `bodies.cbody`): this package
imports nothing itself, so that reading a compiled C body does not load the
assembler.
"""
