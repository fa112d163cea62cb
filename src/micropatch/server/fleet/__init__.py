"""What the server does, on a database session, one module per resource: users and
their tokens (`users`), groups and policies (`groups`), enrollment and hosts
(`hosts`), publishing and revocation (`patches`), events and the audit log
(`records`).

The API (`server.api`), the console (`server.console`) and the CLI (`server admin
…`) all call these; each raises the `server.errors` refusals.
"""
