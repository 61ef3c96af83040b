"""Security of the control plane: CURVE on tcp endpoints, client keys, roles, the audit log.

* :mod:`~microkernel.security.settings` — the ``[security]`` table;
* :mod:`~microkernel.security.keys` — key files (``mkctl keygen``) and the client's key settings;
* :mod:`~microkernel.security.roles` — roles and the one table of what each request needs;
* :mod:`~microkernel.security.guard` — the per-request decision, called by the control router;
* :mod:`~microkernel.security.authenticator` — the ZAP handler and the key-aware tcp socket;
* :mod:`~microkernel.security.gate` — how the kernel wires it all;
* :mod:`~microkernel.security.audit` — the ``microkernel.audit`` log lines.

See ``docs/security.md``.
"""
