"""The lab CloudStack: a test double of CloudStack's management-server API, for the lab only.

A real CloudStack cannot run where the product is developed and tested, so the lab has this
double: a small implementation of the API calls the product makes, not a table of canned answers.
To a client it should be indistinguishable from CloudStack on those calls: requests are signed and
verified as CloudStack verifies them, answers have CloudStack's JSON shapes and error codes,
asynchronous commands go through jobs, and the state rules CloudStack enforces on VMs, volumes and
snapshots are enforced here, synchronously or inside the job as CloudStack does.

The layers (moto's split of a service double):

``signing``   how CloudStack checks a request's signature (``ApiServer.verifyRequest``)
``errors``    CloudStack's error codes and the Java exceptions behind them
``seed``      the fixed cloud: zones, offerings, networks, templates (a JSON seed file)
``state``     what clients create (VMs, volumes, snapshots, jobs), saved atomically in the data dir
``storage``   volume and snapshot files (raw), and the OMA guest's ``disk/by-id`` links
``hypervisor`` the zone's one KVM host: a qemu process per running user VM, its console
``cloud``     the state model and CloudStack's rules
``jobs``      asynchronous jobs (``queryAsyncJobResult``)
``commands``  each API command: parameters as CloudStack declares them, what it does
``render``    CloudStack's JSON for every object, list and error
``faults``    lab-only fault injection
``app``       HTTP: ``/client/api``, ``/lab/faults``, ``/lab/state``, ``/lab/vms/<id>/console``
``cli``       ``cloudstack-lab`` / ``python -m lab.cloudstack``

``docs/cloudstack-lab.md`` is the user's guide: command line, commands, rules, admin endpoints,
and what the double does not do.
"""
