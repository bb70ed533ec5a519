"""arena votes: side-by-side battles of two models' answers, labelers' votes on them, and claims.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "battles",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("model_a", sa.String(512), nullable=False),
        sa.Column("answer_a", sa.Text, nullable=False),
        sa.Column("model_b", sa.String(512), nullable=False),
        sa.Column("answer_b", sa.Text, nullable=False),
        sa.Column("votes_needed", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_battles_tag", "battles", ["tag"])
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("battle_id", sa.Integer, sa.ForeignKey("battles.id"), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("choice", sa.String(16), nullable=False),
        sa.Column("token", sa.String(64), nullable=False, unique=True),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("battle_id", "user_id"),
    )
    op.create_index("ix_votes_battle_id", "votes", ["battle_id"])
    op.create_index("ix_votes_user_id", "votes", ["user_id"])
    op.create_table(
        "battle_claims",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("battle_id", sa.Integer, sa.ForeignKey("battles.id"), nullable=False),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("battle_id", "user_id"),
    )
    op.create_index("ix_battle_claims_battle_id", "battle_claims", ["battle_id"])


def downgrade() -> None:
    for table in ("battle_claims", "votes", "battles"):
        op.drop_table(table)
