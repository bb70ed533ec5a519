"""items.n_responses: the number of candidate responses, so the ranking queue filters in SQL.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("n_responses", sa.Integer, nullable=False, server_default="0"))
    conn = op.get_bind()
    items = sa.table("items", sa.column("id", sa.Integer), sa.column("responses", sa.JSON),
                     sa.column("n_responses", sa.Integer))
    for item_id, responses in conn.execute(sa.select(items.c.id, items.c.responses)).all():
        conn.execute(items.update().where(items.c.id == item_id).values(n_responses=len(responses or [])))


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("n_responses")
