"""The vSphere domain: everything the VMA asks vCenter, through pyvmomi.

:mod:`~vma.vsphere.client` holds the session (TLS modes, deadlines, worker threads), discovery,
CBT, snapshots and changed areas. It imports nothing else of the VMA.
"""
