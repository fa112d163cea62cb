"""The host agent: keeps every process on the host patched by policy (docs/agent.md)."""
