"""VMware (vCenter) credentials: stored with the password encrypted at rest, resolved into the
login a discovery, a replication or a backup hands to the VMA, and tested through the VMA.

Other domains use :func:`oma.credentials.vmware.resolve_login`,
:class:`oma.credentials.vmware.VCenterLogin` and :func:`oma.credentials.vmware.discover_with`,
nothing else. The HTTP side is
:mod:`oma.api.credentials`.
"""
