"""Patchlet bodies (assembly, guards, C) compiled to machine code by a `Toolchain`."""

from micropatch.bodies.cbody import CCompileError, CompiledC
from micropatch.bodies.toolchain import Toolchain

__all__ = ["CCompileError", "CompiledC", "Toolchain"]
