"""Alembic environment: run with the connection that `store.migrate` passes in (online only)."""

from alembic import context

from cherrytop.feedback.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
