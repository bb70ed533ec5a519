"""accounts: disabled users, per-client login throttling, session revocation; review claims (hardening).

Login throttling keys (`user:<name>@<address>`, `ip:<address>`) and session revocation need no
schema change; `users.disabled` and the `review_claims` table are new.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "review_claims",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("demonstration_id", sa.Integer, sa.ForeignKey("demonstrations.id"), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("demonstration_id", "user_id"),
    )
    op.create_index("ix_review_claims_demonstration_id", "review_claims", ["demonstration_id"])


def downgrade() -> None:
    op.drop_table("review_claims")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("disabled")
