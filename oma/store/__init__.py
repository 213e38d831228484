"""The OMA's PostgreSQL storage: the numbered schema migrations and what every domain needs to read
rows and pages back. Domains import it; the HTTP layer reaches the database only through them."""

from __future__ import annotations

from pathlib import Path

#: The numbered ``NNN_name.sql`` files applied in order at startup (``pyapp.db.apply_migrations``).
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
