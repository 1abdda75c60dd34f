"""What PostgreSQL access can fail with: one hierarchy under :class:`DatabaseError`."""

from __future__ import annotations


class DatabaseError(Exception):
    """Base class for errors raised by this module."""


class DatabaseUnavailable(DatabaseError):
    """The server could not be reached (or refused us) within the allowed wait."""


class DatabaseRefused(DatabaseUnavailable):
    """The server answered but refused us (bad password, no such role or database): retrying cannot help."""


class UnsupportedPostgres(DatabaseError):
    """The server is older than PostgreSQL 13."""


class MigrationError(DatabaseError):
    """The migration files are malformed or one of them failed to apply."""
