"""The bot's cogs: channel chat and the character slash commands."""
