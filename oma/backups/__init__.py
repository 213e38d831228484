"""Backups: repositories, the backup engine, copies and retention (see docs/backup.md)."""
