"""Scopes: every character belongs to the shared cast or one server; a gate mix is `mix`.

Characters submitted before scopes existed were seen by every server; where they came from
was not recorded, so they join the shared cast (their keys do not change). Names are no
longer unique across the table: two servers may each have a "Nami"; the catalog keeps
names unique within what one server sees.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("characters") as batch:
        batch.add_column(sa.Column("scope", sa.String(40), nullable=False, server_default="shared"))
        batch.alter_column(
            "fused_from", new_column_name="mix", existing_type=sa.JSON(), existing_nullable=False
        )
        batch.drop_constraint("uq_characters_name", type_="unique")
        batch.create_index("ix_characters_scope", ["scope"])


def downgrade() -> None:
    with op.batch_alter_table("characters") as batch:
        batch.drop_index("ix_characters_scope")
        batch.create_unique_constraint("uq_characters_name", ["name"])
        batch.alter_column(
            "mix", new_column_name="fused_from", existing_type=sa.JSON(), existing_nullable=False
        )
        batch.drop_column("scope")
