"""Scenes: a channel holds a list of characters and a mode saying who answers.

The channel's one speaker (`character_key`, or `persona` with its `mix`) becomes a scene of
one. Character lines may carry longer author ids (`character:<key>`), and remember the
platform message they were posted as, so a reply to that message addresses its character.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_old = sa.table(
    "channel_state",
    sa.column("channel_id", sa.String),
    sa.column("character_key", sa.String),
    sa.column("persona", sa.Text),
    sa.column("mix", sa.JSON),
    sa.column("scene", sa.JSON),
)


def upgrade() -> None:
    with op.batch_alter_table("channel_state") as batch:
        batch.add_column(
            sa.Column("scene", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
        batch.add_column(
            sa.Column("scene_mode", sa.String(16), nullable=False, server_default="all")
        )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(_old.c.channel_id, _old.c.character_key, _old.c.persona, _old.c.mix)
    )
    for channel, key, persona, mix in list(rows):
        scene = (
            [{"key": key}] if key else [{"persona": persona, "mix": mix or {}}] if persona else []
        )
        bind.execute(_old.update().where(_old.c.channel_id == channel).values(scene=scene))
    with op.batch_alter_table("channel_state") as batch:
        batch.drop_column("character_key")
        batch.drop_column("persona")
        batch.drop_column("mix")
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("author_id", type_=sa.String(160), existing_nullable=False)
        batch.add_column(sa.Column("posted_id", sa.String(64), nullable=True))
        batch.create_index("ix_messages_posted_id", ["posted_id"])


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_posted_id")
        batch.drop_column("posted_id")
        batch.alter_column("author_id", type_=sa.String(64), existing_nullable=False)
    with op.batch_alter_table("channel_state") as batch:
        batch.add_column(sa.Column("character_key", sa.String(128), nullable=True))
        batch.add_column(sa.Column("persona", sa.Text(), nullable=True))
        batch.add_column(sa.Column("mix", sa.JSON(), nullable=False, server_default="{}"))
    bind = op.get_bind()
    for channel, scene in list(bind.execute(sa.select(_old.c.channel_id, _old.c.scene))):
        first = (scene or [{}])[0]  # a scene of several keeps its first character
        bind.execute(
            _old.update()
            .where(_old.c.channel_id == channel)
            .values(
                character_key=first.get("key"),
                persona=first.get("persona"),
                mix=first.get("mix") or {},
            )
        )
    with op.batch_alter_table("channel_state") as batch:
        batch.drop_column("scene_mode")
        batch.drop_column("scene")
