"""Memory: embeddings of old lines for recall, and what the last reply recalled.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("embedding", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("channel_state") as batch:
        batch.add_column(
            sa.Column("recalled", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )


def downgrade() -> None:
    with op.batch_alter_table("channel_state") as batch:
        batch.drop_column("recalled")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("embedding")
