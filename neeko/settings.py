"""Runtime settings from the environment (and `.env`), one class per section.

Every variable is listed, with a comment, in `.env.example`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class _Section(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")


class ChatSettings(_Section):
    """The chat service: storage, queue, model and conversation limits."""

    model_config = SettingsConfigDict(
        env_prefix="NEEKO_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    database_url: str = Field("", validation_alias="DATABASE_URL")
    """SQLAlchemy URL; empty means the SQLite file `db_path`."""
    db_path: str = "neeko.db"
    redis_url: str = Field("", validation_alias="REDIS_URL")
    """Redis for the turn queue; empty runs an in-process queue and worker."""
    store: str = ""
    """Character store folder; empty means the packaged starter cast."""
    model: str = "default"
    device: str | None = None
    decode: Literal["eager", "compiled", "auto"] = "auto"
    """The embedded worker's decode step: eager, compiled (`neeko.compiled`; the first
    step of each batch size and length bucket compiles for a while, later ones are faster),
    or auto: compiled where the native C step runs (the CPU), else eager; lower-precision
    `weights` always compile."""
    weights: Literal["fp32", "bf16", "int8", "int4"] = "fp32"
    """Weight storage of the compiled decode step (weight-only; the blocks stay fp32)."""
    history_tokens: int = Field(1536, ge=64)
    """Token budget of the history in a prompt (older turns are left out)."""
    reply_tokens: int = Field(200, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_message_chars: int = Field(2000, ge=1)
    cooldown_s: float = Field(2.0, ge=0)
    """Least seconds between two messages of one user."""
    max_pending: int = Field(8, ge=1)
    """Most messages of one channel being answered or waiting; more are turned away."""
    turn_timeout_s: float = Field(300.0, gt=0)
    memory_tokens: int = Field(256, ge=0)
    """Budget of the lines recalled from earlier in a conversation (0: no recall)."""
    lore_tokens: int = Field(400, ge=0)
    """Most tokens of lorebook entries in one prompt (a book's own budget may be smaller)."""
    max_scene: int = Field(6, ge=1, le=16)
    """Most characters in one channel's scene."""
    scene_max_streak: int = Field(3, ge=1)
    """In `auto` mode, most replies in a row by one character (unless it is named)."""
    max_characters_per_scope: int = Field(50, ge=0)
    """Most characters one server (or the terminal) may add; the shared cast is not counted."""
    max_jobs_per_scope: int = Field(2, ge=1)
    """Most training jobs of one server queued or running at once."""


class DiscordSettings(_Section):
    """The Discord bot."""

    model_config = SettingsConfigDict(
        env_prefix="DISCORD_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    token: SecretStr
    """Bot token (required, no default)."""
    moderator_role: str = ""
    """Id of a role whose members may moderate their server's characters (besides Manage
    Server). A role name counts only in the server `guild_id`: any server can make a role
    of any name."""
    guild_id: int | None = None
    """Sync slash commands to this guild only (instant; for development)."""
    owner_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    """User ids of the bot's owners: they manage the shared cast, seen in every server.
    From the environment: ids split by commas."""
    channels: Annotated[frozenset[int], NoDecode] = frozenset()
    """Ids of the channels characters speak in (a thread counts as its parent channel);
    empty: every channel the bot can read. From the environment: ids split by commas."""

    @field_validator("channels", "owner_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        return value.replace(",", " ").split() if isinstance(value, str) else value
