"""`neeko chat`: the chat service in a terminal (also with stdin piped, no TTY needed).

Embedded by default: a SQLite file, the in-process queue and worker, the packaged model
and the starter cast. Lines starting with `/` are commands; anything else is a message to
the channel's character, whose reply streams as it is generated.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from neeko.characters import LOCAL
from neeko.chat import ChatService
from neeko.chat_types import Answer, Author, Speaker
from neeko.moderation import Moderation
from neeko.settings import ChatSettings

HELP = """commands:
  /become NAME        switch character (a name, an alias, or a description to fuse)
  /scene              who is in this channel's scene, and its mode
  /scene add NAME     bring a character (or a described persona) into the scene
  /scene remove NAME  take one out
  /scene mode MODE    all: everyone answers; addressed: the one named (else the last
                      to speak); auto: the one named, else the best match
  /retry              re-roll the newest reply (a new sample, shown in its place)
  /alt N              show version N of the newest reply (it is the one kept)
  /memory             what the last reply recalled (earlier lines, lorebook entries)
  /characters         list the characters
  /reset              start a new conversation with the same character
  /submit FILE        add a character from a card (.json or .png); playable at once
  /submit NAME: TEXT  add a character from a name and a profile
  /train NAME [FILE]  give a character a block of its own (dialogues: chat JSONL, or
                      else the card's example dialogues); progress is shown here
  /status NAME        a character's status and training
  /help               this list
  /quit               leave (also Ctrl-D); waits for a training job to finish"""


MAX_FILE_BYTES = 1024 * 1024
"""Largest card file accepted."""


class Terminal:
    """Reads lines, writes answers; one channel, one user.

    The terminal is a scope of its own (`local`); its user moderates it and, as the one
    who runs the bot here, owns the shared cast.
    """

    def __init__(
        self, service: ChatService, moderation: Moderation, channel: str, user: str, out: TextIO
    ) -> None:
        """A terminal session on `channel` as `user`."""
        self.service, self.moderation, self.channel, self.out = service, moderation, channel, out
        self.author = Author(
            id=f"terminal:{user}", name=user, moderator=True, owner=True, scope=LOCAL
        )
        self._shown = ""
        self._streaming = False

    def write(self, text: str = "", end: str = "\n") -> None:
        """Print and flush."""
        self.out.write(text + end)
        self.out.flush()

    async def run(self, read_line: Callable[[], Awaitable[str | None]]) -> None:
        """Handle lines until /quit or end of input (`read_line` returns None)."""
        speaker = await self.service.speaker(self.channel, LOCAL)
        self.write(f"[{speaker.name} speaks here. /help lists the commands.]")
        while (line := await read_line()) is not None:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not await self.command(line):
                    return
            else:
                await self.message(line)

    async def command(self, line: str) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        if name in ("quit", "exit", "q"):
            return False
        if name == "become":
            self.show(await self.service.become(self.channel, self.author, arg))
        elif name == "scene":
            self.show(await self.scene(arg.strip()))
        elif name == "retry":
            self.version(await self.service.regenerate(self.channel, self.author))
        elif name == "alt":
            if not arg.strip().isdigit():
                self.write("[usage: /alt N, a version number from 1]")
            else:
                index = int(arg) - 1
                self.version(await self.service.choose(self.channel, self.author, None, index))
        elif name == "memory":
            self.show(await self.service.memory(self.channel, LOCAL))
        elif name == "characters":
            for c in await self.service.characters(LOCAL):
                aliases = f" (also {', '.join(c.aliases)})" if c.aliases else ""
                self.write(f"  {c.name}{aliases} [{c.status}]: {c.description}")
        elif name == "reset":
            self.show(await self.service.reset(self.channel, self.author))
        elif name == "submit":
            self.show(await self.submit(arg.strip()))
        elif name == "train":
            self.show(await self.train(arg.strip()))
        elif name == "status":
            self.show(await self.moderation.status(self.author, arg.strip()))
        elif name == "help":
            self.write(HELP)
        else:
            self.write(f"unknown command /{name}\n{HELP}")
        return True

    async def scene(self, arg: str) -> Answer:
        """`/scene`, `/scene add NAME`, `/scene remove NAME`, `/scene mode MODE`."""
        verb, _, rest = arg.partition(" ")
        if not verb:
            return await self.service.scene(self.channel, LOCAL)
        if verb == "add":
            return await self.service.scene_add(self.channel, self.author, rest)
        if verb == "remove":
            return await self.service.scene_remove(self.channel, self.author, rest)
        if verb == "mode":
            return await self.service.scene_mode(self.channel, self.author, rest)
        return Answer(False, f"unknown /scene {verb}: use add, remove or mode")

    async def submit(self, arg: str) -> Answer:
        """`/submit FILE` (a card) or `/submit NAME: PROFILE`."""
        path = Path(arg).expanduser()
        if arg and path.is_file():
            if path.stat().st_size > MAX_FILE_BYTES:
                return Answer(False, f"{path} is too large: at most 1 MB.")
            data = await asyncio.to_thread(path.read_bytes)
            return await self.moderation.submit(self.author, card=data, filename=path.name)
        name, colon, profile = arg.partition(":")
        if not colon:
            return Answer(False, f"No card file {arg!r}; or give a name and a profile: NAME: TEXT")
        return await self.moderation.submit(self.author, name=name.strip(), profile=profile.strip())

    async def train(self, arg: str) -> Answer:
        """`/train NAME [FILE]`: queue an expansion job, its progress printed as it comes."""
        name, data = arg, None
        head, _, last = arg.rpartition(" ")
        if head and Path(last).expanduser().is_file():
            name, data = head, await asyncio.to_thread(Path(last).expanduser().read_bytes)
        elif head and last.endswith((".jsonl", ".json")):
            return Answer(False, f"No such file: {last}")

        async def progress(line: str) -> None:
            self.write(f"[{line}]")

        return await self.moderation.train(self.author, name.strip(), self.channel, data, progress)

    async def message(self, text: str) -> None:
        """Send a message; stream a lone reply, print a scene's replies in order."""
        self._shown, self._streaming = "", False
        answer = await self.service.handle_message(
            self.channel, self.author, text, uuid.uuid4().hex, on_text=self._stream
        )
        for i, one in enumerate(answer.all()):
            streamed = i == 0 and self._streaming
            if one.ok and one.speaker is not None:
                if streamed:
                    self._stream_final(one.text)
                else:
                    self.write(f"{one.speaker.name}: {one.text}")
            else:
                if streamed:
                    self.write("" if not self._shown else "\n", end="")
                self.write(f"[{one.text}]")
            for notice in one.notices:
                self.write(f"[{notice}]")

    async def _stream(self, speaker: Speaker, text: str) -> None:
        if not self._streaming:
            self.write(f"{speaker.name}: ", end="")
            self._streaming = True
        if not text.startswith(self._shown):  # the reply restarted on another worker
            self.write("\n  ...", end="")
            self._shown = ""
        self.write(text[len(self._shown) :], end="")
        self._shown = text

    def _stream_final(self, text: str) -> None:
        if text.startswith(self._shown):
            self.write(text[len(self._shown) :])
        elif text.startswith(self._shown.rstrip()):  # shown, but for whitespace it strips
            self.write("", end="" if self._shown.endswith("\n") else "\n")
        else:  # the reply restarted after the last chunk shown
            self.write(f"\n{text}")

    def version(self, answer: Answer) -> None:
        """Print a re-rolled or chosen version of a reply, with which one it is."""
        if not answer.ok or answer.speaker is None:
            self.write(f"[{answer.text}]")
            return
        shown, total = answer.alternative or (1, 1)
        self.write(f"{answer.speaker.name}: {answer.text}  [{shown}/{total}]")

    def show(self, answer: Answer) -> None:
        """Print a command's answer (and the new speaker's greeting)."""
        self.write(f"[{answer.text}]")
        for notice in answer.notices:
            self.write(f"[{notice}]")
        if answer.greeting and answer.speaker is not None:
            self.write(f"{answer.speaker.name}: {answer.greeting}")


async def chat(settings: ChatSettings, channel: str, user: str) -> int:
    """Run the terminal chat until /quit or end of input; returns the exit code."""
    from neeko.wiring import open_services

    interactive = sys.stdin.isatty()

    async def read_line() -> str | None:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = await asyncio.to_thread(sys.stdin.readline)
        return line or None

    async with open_services(settings) as (service, moderation):
        await Terminal(service, moderation, channel, user, sys.stdout).run(read_line)
    return 0
