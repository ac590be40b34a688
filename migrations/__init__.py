"""Alembic migration chain of the saescope store (applied by `saescope db upgrade`)."""
