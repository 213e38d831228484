"""The VMA's side of the OMA API: :mod:`~vma.oma_client.client` logs in with the enrollment
credentials, renews its token and rides out an unreachable OMA. It imports nothing else of the
VMA.
"""
