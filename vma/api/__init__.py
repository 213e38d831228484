"""The VMA's REST API, one blueprint per area of the VMA seed (all under ``/api/v1``)."""
