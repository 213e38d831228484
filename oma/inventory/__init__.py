"""What the OMA knows of vCenter's VMs, and which of them it manages.

- :mod:`oma.inventory.vms` — the VM inventory (``vms``): the VMs a VMA reported, by inventory push
  or discovery, upserted by their VMware id;
- :mod:`oma.inventory.contexts` — VM contexts (``vm_contexts``): one per VM under management, by
  its identity (vCenter, managed object id), with its jobs;
- :mod:`oma.inventory.discovery` — discovery through the VMA, and adding discovered VMs to
  management (as contexts, without creating any job).

It uses :func:`oma.credentials.vmware.resolve_login` and
:func:`oma.credentials.vmware.discover_with` for the vCenter login of a discovery. The
HTTP side is :mod:`oma.api.vms`, :mod:`oma.api.vm_contexts` and :mod:`oma.api.discovery`.
"""
