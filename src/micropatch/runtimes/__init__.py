"""Runtimes beside the native one: what is specific to patching an interpreter.

`runtimes.cpython` patches Python functions of running CPython processes
(docs/python-patches.md). `runtimes.base` is the interface a runtime offers the
agent and the server (identity → is this process affected → apply / remove /
status), shaped so that the native engine can sit behind it too.
"""
