"""Initial schema: characters, channel state, messages, training jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "characters",
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("fused_from", sa.JSON(), nullable=False),
        sa.Column("submitted_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_characters"),
        sa.UniqueConstraint("name", name="uq_characters_name"),
    )
    op.create_table(
        "channel_state",
        sa.Column("channel_id", sa.String(64), nullable=False),
        sa.Column("character_key", sa.String(128), nullable=True),
        sa.Column("persona", sa.Text(), nullable=True),
        sa.Column("mix", sa.JSON(), nullable=False),
        sa.Column("session", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.String(64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("channel_id", name="pk_channel_state"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("channel_id", sa.String(64), nullable=False),
        sa.Column("session", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("author_id", sa.String(64), nullable=False),
        sa.Column("author_name", sa.String(128), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("platform_message_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["channel_state.channel_id"],
            name="fk_messages_channel_id_channel_state",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("platform_message_id", name="uq_messages_platform_message_id"),
    )
    op.create_index("ix_messages_channel_session", "messages", ["channel_id", "session", "id"])
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("character_key", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.String(64), nullable=False),
        sa.Column("channel_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_training_jobs"),
        sa.ForeignKeyConstraint(
            ["character_key"],
            ["characters.key"],
            name="fk_training_jobs_character_key_characters",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("training_jobs")
    op.drop_index("ix_messages_channel_session", table_name="messages")
    op.drop_table("messages")
    op.drop_table("channel_state")
    op.drop_table("characters")
