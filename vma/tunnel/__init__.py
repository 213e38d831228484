"""The VMA's SSH tunnel to the OMA (docs/tunnel.md): one OpenSSH ``ssh -N`` child, kept up for as
long as the service runs.

- ``-R 127.0.0.1:<tunnel_remote_port>:<api host>:<api port>``: the OMA calls this VMA's API on its
  own loopback port (9081);
- ``-L <tunnel_local_address>:<p>:127.0.0.1:<p>`` for each of ``tunnel_forward_ports``: this VMA
  reaches the OMA's API and its NBD exports (served on a fixed port range, ``OMA_NBD_PORTS``) at
  the same port numbers, so the export URIs the OMA sends need no translation;
- the OMA's host key is pinned (``StrictHostKeyChecking=yes`` against the VMA's own known_hosts,
  written by ``vma-enroll``); a changed key is refused, and said so in ``/health`` and the log;
- keep-alives every ``tunnel_keepalive`` seconds (three missed end the connection), and
  ``ExitOnForwardFailure``: a tunnel without its forwards is no tunnel;
- when the child ends it is started again after a backoff (doubling up to ``tunnel_backoff_max``,
  reset once a connection stayed up a minute). A copy in flight loses its NBD connections with it
  and resumes from its checkpoint when they come back (the mover's ``reconnect_timeout``).

:mod:`vma.tunnel.ssh` holds the command line and the supervisor, :class:`~vma.tunnel.ssh.Tunnel`.
"""
