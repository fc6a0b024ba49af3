"""What the chat service takes and returns; shared by every front end (Discord, terminal)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Author:
    """Who sent a message or command."""

    id: str
    name: str
    """Display name, shown to the character in the history."""
    moderator: bool = False
    """May submit and train the characters of `scope` (the front end decides, e.g. Manage
    Server)."""
    owner: bool = False
    """May manage the shared cast, seen in every scope (the bot's owners; the terminal
    user)."""
    scope: str = "local"
    """Where the author acts: `guild:<id>` in a Discord server, `local` in the terminal."""


@dataclass(frozen=True)
class Speaker:
    """Who answers in a channel: a character or a fused persona."""

    name: str
    avatar_url: str = ""


@dataclass
class Answer:
    """The outcome of a message or command.

    `ok` False means nothing changed and `text` says why. `private` answers (errors, admin
    replies) are shown only to the author where the front end can (ephemeral in Discord).
    """

    ok: bool
    text: str
    speaker: Speaker | None = None
    """For a character's reply: who speaks (name and avatar for the webhook)."""
    notices: list[str] = field(default_factory=list)
    """Side remarks, e.g. that older history was left out of the prompt."""
    suggestions: list[str] = field(default_factory=list)
    """Close character names, for an unknown one."""
    private: bool = False
    kind: Literal["reply", "info", "error", "busy"] = "info"
    greeting: str = ""
    """After /become: the new speaker's opening line, to post in the channel as the speaker."""
    ref: int | None = None
    """A character's reply: its stored line (for `ChatService.mark_posted`)."""
    alternative: tuple[int, int] | None = None
    """A re-rolled or browsed reply: which version is shown, of how many (from 1)."""
    more: list[Answer] = field(default_factory=list)
    """The other characters' answers to the same message, in scene order."""

    def all(self) -> list[Answer]:
        """This answer and the ones in `more`."""
        return [self, *self.more]


def refusal(text: str, suggestions: list[str] | None = None) -> Answer:
    """A private refusal: nothing changed, `text` says why."""
    return Answer(False, text, suggestions=suggestions or [], private=True, kind="error")


@dataclass(frozen=True)
class CharacterInfo:
    """One entry of the character list."""

    key: str
    name: str
    aliases: tuple[str, ...]
    status: str
    """fused | training | trained."""
    description: str
    """The first sentence or so of the profile."""
    avatar_url: str = ""


TextCallback = Callable[[Speaker, str], Awaitable[None]]
"""Called with who speaks and the whole reply text so far, whenever it grows (streaming):
the speaker comes with the text, so a front end never asks the service mid-reply."""
