"""`neeko db`: migrate the bot's database, check the models against the migrations."""

from __future__ import annotations

import argparse
import asyncio
import os

from alembic.script import ScriptDirectory

from neeko import db


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `neeko db upgrade` and `neeko db check`."""
    parser = sub.add_parser("db", help="database migrations (Alembic)")
    db_sub = parser.add_subparsers(title="database commands")
    upgrade = db_sub.add_parser("upgrade", help="migrate the database to the latest schema")
    _target_arguments(upgrade)
    upgrade.set_defaults(func=upgrade_main)
    check = db_sub.add_parser("check", help="fail if the models need a migration")
    _target_arguments(check)
    check.set_defaults(func=check_main)


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--database-url", default=None, help="default: $DATABASE_URL")
    target.add_argument(
        "--db-path", default=None, help="SQLite file (default: $NEEKO_DB_PATH, else neeko.db)"
    )


def target_url(args: argparse.Namespace) -> str:
    """The database the arguments name, else $DATABASE_URL, else $NEEKO_DB_PATH or neeko.db."""
    if args.database_url:
        return db.database_url(args.database_url)
    if args.db_path:
        return db.database_url(None, args.db_path)
    return db.database_url(
        os.environ.get("DATABASE_URL"), os.environ.get("NEEKO_DB_PATH", "neeko.db")
    )


def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()


def upgrade_main(args: argparse.Namespace) -> int:
    """`neeko db upgrade`: migrate the database to head.

    Raises:
        MigrationError: The database cannot be opened or migrated.
    """
    url = target_url(args)
    asyncio.run(db.upgrade(url))
    print(f"{db.safe_url(url)}: upgraded to revision {_head(url)} (head)")
    return 0


def check_main(args: argparse.Namespace) -> int:
    """`neeko db check`: fail unless the migrations build the schema of the models.

    Raises:
        MigrationError: A migration is missing, or the database is not at head.
    """
    url = target_url(args)
    db.check(url)
    print(f"{db.safe_url(url)}: at revision {_head(url)}, no migration missing")
    return 0
