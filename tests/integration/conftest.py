"""Fixtures of the agent tests (tests/integration/agentproc.py): a sandbox per test,
targets started in it, a key pair, and an agent in it."""

from .agentproc import agent, box, keys, nstart  # noqa: F401
