"""Swipes: a character's reply keeps its alternatives, and which one is shown.

`content` stays the line the conversation goes on with (the alternative shown).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("alternatives", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("alternative", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("alternative")
        batch.drop_column("alternatives")
