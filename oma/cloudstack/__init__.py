"""The OMA's CloudStack side: settings, discovery, validation, network mappings and replica volumes.

The OMA runs in a VM of the CloudStack it moves VMs into ("the OMA VM"). This package holds all
the OMA knows of CloudStack, in layers that each import only those above them:

- :mod:`.client` — CloudStack's API through the kept ``cs`` library (signing, calls) in worker
  threads: timeouts, retries with backoff, async-job polling, CloudStack's errors in the API's
  envelope; requests ``cs`` would sign wrongly (a ``~`` in a value) refused before they leave;
- :mod:`.settings` — the stored settings (``cloudstack_configs``): keys encrypted at rest and
  never returned; the active set; a request's own login;
- :mod:`.resources` — zones, domains, templates, offerings, networks, VMs and volumes in the
  OMA's field names;
- :mod:`.omavm` — finding the OMA VM by this host's MAC or IP addresses;
- :mod:`.validation` — the readiness checks (zone, offerings, network, OMA VM, permissions,
  free volume slots);
- :mod:`.network_mappings` — source network → CloudStack network per managed VM, live and
  test apart;
- :mod:`.volumes` — replica volumes: create, attach to the OMA VM one operation at a time, find
  the device by id, detach, delete;
- :mod:`.service` — one function per API endpoint, given the database, the secret box and the
  configuration.

Nothing here imports the API layer (``oma.api``), the app or its state: callers pass the
database, the secret box and the configuration. Every CloudStack failure surfaces as an
:class:`~pyapp.api.ApiError` (:class:`.client.CloudStackError`) with the status and code of
:func:`.client.map_error`; docs/cloudstack.md is the operator's side of it.
"""
