"""Discord front end: thin discord.py cogs over `neeko.chat.ChatService`."""
