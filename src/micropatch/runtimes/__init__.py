"""Runtimes beside the native one: what is specific to patching an interpreter.

`runtimes.cpython` patches Python functions of running CPython processes
(docs/python-patches.md). `runtimes.engines` sends each operation to the engine
of the patch's runtime (native: `live`; cpython), and reads the registries of
both; `runtimes.base` holds the result types both engines' results share.
"""
