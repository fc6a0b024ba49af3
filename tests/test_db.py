"""The database: Alembic migrations vs the models, connection pragmas, constraints, `neeko db`."""

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.exc import IntegrityError

from neeko import db, dbcli
from neeko.errors import NeekoError

TABLES = {"alembic_version", "characters", "channel_state", "messages", "training_jobs"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """A SQLite file, and a PostgreSQL database where a server answers."""
    if request.param == "postgresql":
        return db.database_url(request.getfixturevalue("postgres_url"))
    return db.database_url(None, tmp_path / "neeko.db")


@pytest.fixture
async def engine(url):
    await db.upgrade(url)
    engine = db.make_engine(url)
    yield engine
    await engine.dispose()


async def _tables(url):
    engine = db.make_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def _message(channel_id="c1", platform_message_id="m1"):
    return db.MessageRow(
        channel_id=channel_id,
        session=0,
        role="user",
        author_id="u1",
        author_name="Ann",
        content="hello",
        platform_message_id=platform_message_id,
    )


async def test_upgrade_creates_every_table(url):
    await db.upgrade(url)  # from inside the test's running event loop
    assert await _tables(url) == TABLES
    assert {t.name for t in db.Base.metadata.sorted_tables} == TABLES - {"alembic_version"}


async def test_check_passes_at_head(url):
    await db.upgrade(url)
    await asyncio.to_thread(db.check, url)


async def test_check_fails_when_a_model_changes(url, monkeypatch):
    await db.upgrade(url)
    changed = sa.MetaData(naming_convention=db.Base.metadata.naming_convention)
    for table in db.Base.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["messages"].append_column(sa.Column("edited_at", sa.DateTime(timezone=True)))
    monkeypatch.setattr(db.Base, "metadata", changed)
    with pytest.raises(db.MigrationError, match=r"differ.*edited_at"):
        await asyncio.to_thread(db.check, url)


async def test_downgrade_to_base_then_upgrade_again(url):
    await db.upgrade(url)
    await asyncio.to_thread(command.downgrade, db.alembic_config(url), "base")
    assert await _tables(url) == {"alembic_version"}
    with pytest.raises(db.MigrationError, match="not up to date"):
        await asyncio.to_thread(db.check, url)
    await db.upgrade(url)
    assert await _tables(url) == TABLES


async def test_sqlite_connection_pragmas(tmp_path):
    engine = db.make_engine(db.database_url(None, tmp_path / "neeko.db"))
    async with engine.connect() as conn:
        pragma = {
            name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
        }
    assert pragma == {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "busy_timeout": 5000,
        "synchronous": 1,
    }
    await engine.dispose()


async def test_foreign_keys_are_enforced(engine):
    sessions = db.sessionmaker(engine)
    async with sessions() as session:
        session.add(_message(channel_id="unknown"))
        with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
            await session.commit()
    async with sessions() as session:
        session.add(db.ChannelState(channel_id="c1"))
        await session.flush()
        session.add(_message())
        await session.commit()
        await session.execute(sa.delete(db.ChannelState))  # ON DELETE CASCADE
        await session.commit()
        assert await session.scalar(sa.select(sa.func.count()).select_from(db.MessageRow)) == 0


async def test_platform_message_id_is_unique(engine):
    sessions = db.sessionmaker(engine)
    async with sessions() as session:
        session.add(db.ChannelState(channel_id="c1"))
        await session.flush()
        session.add_all([_message(platform_message_id=None), _message(platform_message_id=None)])
        session.add(_message(platform_message_id="m1"))
        await session.commit()
        session.add(_message(platform_message_id="m1"))
        with pytest.raises(IntegrityError, match=r"(?i)unique"):
            await session.commit()


async def test_attributes_stay_readable_after_commit(engine):
    async with db.sessionmaker(engine)() as session:
        row = db.ChannelState(channel_id="c1", scene=[{"persona": "a pirate", "mix": {}}])
        session.add(row)
        await session.commit()
    # With expire_on_commit=True these would need a lazy load (MissingGreenlet under asyncio).
    assert (row.channel_id, row.scene, row.session, row.scene_mode) == (
        "c1",
        [{"persona": "a pirate", "mix": {}}],
        0,
        "all",
    )
    assert row.updated_at.tzinfo is not None


async def test_a_channels_one_speaker_becomes_a_scene_of_one_and_back(url):
    """0003 moves each channel's character (or persona and mix) into its scene, and back."""
    await db.upgrade(url, "0002")
    engine = db.make_engine(url)
    old = [
        ("c1", "mara_vell", None, "{}"),
        ("c2", None, "a pirate", '{"mara_vell": 1.0}'),
        ("c3", None, None, "{}"),
    ]
    async with engine.begin() as conn:
        for channel, key, persona, mix in old:
            await conn.execute(
                sa.text(
                    "INSERT INTO channel_state (channel_id, character_key, persona, mix, "
                    "session, updated_at) VALUES (:c, :k, :p, :m, 3, CURRENT_TIMESTAMP)"
                ),
                {"c": channel, "k": key, "p": persona, "m": mix},
            )
    await db.upgrade(url)
    async with db.sessionmaker(engine)() as session:
        rows = {r.channel_id: r for r in await session.scalars(sa.select(db.ChannelState))}
    assert rows["c1"].scene == [{"key": "mara_vell"}]
    assert rows["c2"].scene == [{"persona": "a pirate", "mix": {"mara_vell": 1.0}}]
    assert rows["c3"].scene == []
    assert {r.session for r in rows.values()} == {3}
    assert {r.scene_mode for r in rows.values()} == {"all"}
    await asyncio.to_thread(command.downgrade, db.alembic_config(url), "0002")
    async with engine.connect() as conn:
        back = await conn.execute(
            sa.text("SELECT channel_id, character_key, persona FROM channel_state")
        )
        assert sorted(back.all()) == [
            ("c1", "mara_vell", None),
            ("c2", None, "a pirate"),
            ("c3", None, None),
        ]
    await engine.dispose()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@host/neeko", "postgresql+asyncpg://u:p@host/neeko"),
        ("postgresql+asyncpg://host/neeko", "postgresql+asyncpg://host/neeko"),
        ("sqlite:///data/neeko.db", "sqlite+aiosqlite:///data/neeko.db"),
        ("sqlite+aiosqlite:////srv/neeko.db", "sqlite+aiosqlite:////srv/neeko.db"),
    ],
)
def test_database_url_picks_async_drivers(given, expected):
    assert db.database_url(given) == expected


def test_database_url_defaults_to_an_absolute_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = f"sqlite+aiosqlite:///{tmp_path.resolve() / 'neeko.db'}"
    assert db.database_url() == expected
    assert db.database_url("", "neeko.db") == expected
    assert db.safe_url("postgresql+asyncpg://u:secret@host/neeko") == (
        "postgresql+asyncpg://u:***@host/neeko"
    )


def test_alembic_command_line_upgrade_then_check(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/x.db"}
    env.pop("NEEKO_DB_PATH", None)
    alembic = [sys.executable, "-m", "alembic", "-c", str(db.MIGRATIONS / "alembic.ini")]
    for args in (["upgrade", "head"], ["check"]):
        result = subprocess.run(
            [*alembic, *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
    assert "No new upgrade operations detected" in result.stdout
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0005",)]


def _neeko_db(*argv):
    parser = argparse.ArgumentParser(prog="neeko")
    dbcli.add_commands(parser.add_subparsers())
    args = parser.parse_args(["db", *argv])
    return args.func(args)


def test_neeko_db_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("NEEKO_DB_PATH", str(tmp_path / "env.db"))
    assert _neeko_db("upgrade") == 0
    assert capsys.readouterr().out.endswith("env.db: upgraded to revision 0005 (head)\n")
    assert _neeko_db("check") == 0
    assert capsys.readouterr().out.endswith("env.db: at revision 0005, no migration missing\n")

    assert _neeko_db("upgrade", "--db-path", str(tmp_path / "path.db")) == 0
    assert (tmp_path / "path.db").exists()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'url.db'}")
    assert _neeko_db("upgrade") == 0
    assert _neeko_db("check", "--database-url", f"sqlite:///{tmp_path / 'url.db'}") == 0


def test_neeko_db_errors(tmp_path, capsys):
    with pytest.raises(NeekoError, match="cannot upgrade nosuchdb://host/x to head"):
        _neeko_db("upgrade", "--database-url", "nosuchdb://host/x")
    with pytest.raises(NeekoError, match="not up to date"):
        _neeko_db("check", "--db-path", str(tmp_path / "empty.db"))
    with pytest.raises(SystemExit):
        _neeko_db("check", "--db-path", "a.db", "--database-url", "sqlite:///b.db")
    assert "not allowed with" in capsys.readouterr().err
