"""Alembic environment: the bot's async engine, batch mode so SQLite can alter tables."""

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from neeko import db

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = db.Base.metadata


def _url() -> str:
    """sqlalchemy.url if set, else $DATABASE_URL, else the SQLite file $NEEKO_DB_PATH."""
    if url := config.get_main_option("sqlalchemy.url"):
        return db.database_url(url)
    if url := os.environ.get("DATABASE_URL"):
        return db.database_url(url)
    return db.database_url(None, os.environ.get("NEEKO_DB_PATH", "neeko.db"))


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kwargs
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = db.make_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
