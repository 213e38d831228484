"""Replication: copying a VM's disks from vCenter (through the VMA) into persistent volumes here."""
