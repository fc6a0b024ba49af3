"""`python -m bot`: run the Discord bot."""

from bot.app import main

main()
