"""The OMA REST API: one blueprint per area of the OMA endpoint list, all under ``/api/v1``."""
