"""served feedback: chat ratings bound to the answer the server served (hardening).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # the served answer a rating names (chatcmpl-...:INDEX); older ratings have none
    with op.batch_alter_table("chat_feedback") as t:
        t.add_column(sa.Column("served_id", sa.String(128), nullable=True))
        t.create_index("ix_chat_feedback_served_id", ["served_id"])


def downgrade() -> None:
    with op.batch_alter_table("chat_feedback") as t:
        t.drop_index("ix_chat_feedback_served_id")
        t.drop_column("served_id")
