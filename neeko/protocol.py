"""Payloads that travel through the queue: typed models, serialised as JSON (never pickle)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from neeko.cards import CharacterCard
from neeko.characters import KEY_PATTERN
from neeko.engine import FinishReason, SamplingParams

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(_Model):
    """One chat message of a turn's prompt."""

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class Sampling(_Model):
    """Sampling settings of a turn (see `neeko.engine.SamplingParams`)."""

    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.7, ge=0, le=10)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def params(self) -> SamplingParams:
        """The engine's sampling parameters."""
        return SamplingParams(**self.model_dump())


class Turn(_Model):
    """One reply to generate: who speaks (a character or a mix), the prompt, the sampling."""

    id: Id
    """Idempotency key: the platform message id. A turn id is answered at most once."""
    channel: str = Field(min_length=1, max_length=128)
    character: str | None = Field(None, min_length=1, max_length=128)
    """Catalog key of the speaking character (trained or fused)."""
    mix: dict[str, float] = Field(default_factory=dict)
    """Or a fused persona: gate weights over trained characters' keys."""
    messages: tuple[Message, ...] = Field(min_length=1)
    sampling: Sampling = Sampling()
    created: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_speaker(self) -> Turn:
        if self.character is not None and self.mix:
            raise ValueError("a turn names a character or a mix, not both")
        if any(not 0 <= w <= 1 for w in self.mix.values()):
            raise ValueError("mix weights must be in [0, 1]")
        return self


class Reply(_Model):
    """A finished reply."""

    turn: Id
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    worker: str
    ttft_s: float = 0.0
    """Engine time from admission to the first token (the rest of a client's wait is queue)."""


class ReplyEvent(_Model):
    """One entry of a turn's reply stream."""

    kind: Literal["chunk", "done", "error"]
    text: str = ""
    """New reply text (`chunk`)."""
    attempt: str = ""
    """Which delivery produced a chunk (`Delivery.tag`); a later one restarts the reply."""
    reply: Reply | None = None
    """The final reply (`done`)."""
    error: str = ""
    """Why the turn failed (`error`)."""


Key = Annotated[str, Field(pattern=KEY_PATTERN)]
Scope = Annotated[str, Field(pattern=r"^(shared|local|guild:\d{1,20})$")]


class TrainJob(_Model):
    """An expansion job: give a character its own block, trained on its dialogues."""

    id: Id
    key: Key
    """The character's storage key, given by the catalog that queued the job."""
    scope: Scope = "shared"
    card: dict
    """The character card (`CharacterCard.to_dict()`)."""
    dialogues: list[dict] = Field(min_length=1)
    """Chat-format dialogues: {"character", "messages": [{"role", "content"}]}."""
    epochs: int = Field(2, ge=1, le=100)
    lr: float = Field(2e-3, gt=0, le=1)
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _valid_card(self) -> TrainJob:
        CharacterCard.from_dict(self.card)  # a CardError is a ValueError: invalid payload
        return self


JobState = Literal["queued", "running", "done", "failed"]


class JobStatus(_Model):
    """Where an expansion job stands."""

    id: Id
    character: str = ""
    state: JobState = "queued"
    progress: float = 0.0
    """Fraction of training steps done, 0..1."""
    loss: float | None = None
    attempts: int = 0
    error: str = ""
    updated: float = Field(default_factory=time.time)


class CatalogEvent(_Model):
    """A change to a character, for the catalogs of other processes.

    `added`: a fused character (its card and mix); `training`; `trained`: it has its own
    block (its bytes are under `keys.block(key)`); `failed`: training ended without one;
    `removed`.
    """

    kind: Literal["added", "training", "trained", "failed", "removed"]
    key: Key
    scope: Scope = "shared"
    card: dict | None = None
    mix: dict[str, float] = Field(default_factory=dict)
    job: str = ""
