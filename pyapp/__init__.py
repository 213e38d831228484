"""Shared Python of the mover: configuration, JSON logging, the error envelope, the typed facade
over the Rust extension (:mod:`pyapp.mover`) and the ``mover`` command."""
