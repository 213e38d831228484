"""Who may call the OMA: user accounts and their roles, bearer tokens, logging in (throttled) and
the authentication audit log. Nothing here sees a request: the HTTP side (the role each view
needs, authenticating a request) is :mod:`oma.api.access`.

- :mod:`oma.access.roles` — the user roles and the principal a token stands for;
- :mod:`oma.access.tokens` — issuing, looking up and listing bearer tokens (sha256 digests);
- :mod:`oma.access.users` — accounts: creation, role and enabled changes, passwords, deletion;
- :mod:`oma.access.login` — a user's or an enrolled VMA's credentials checked, a token issued;
- :mod:`oma.access.throttle` — failed logins counted per user name and client address;
- :mod:`oma.access.audit` — ``auth_audit_log``.

docs/oma.md ("Users and roles") is the contract.
"""
