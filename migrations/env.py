"""Alembic environment: runs on the connection `sae_core.store.db.upgrade` hands over.

Run through `saescope db upgrade` (which resolves the URL the same way every command does), or
plain `alembic -c migrations/alembic.ini upgrade head` with `SAESCOPE_DATABASE_URL` set.
"""

from alembic import context

from sae_core.store.schema import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:  # invoked by the alembic CLI: open our own engine
    from sae_core.store.db import make_engine

    with make_engine().begin() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
