"""The Alembic migrations build the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest_service import BACKENDS, REPO, database_url, rlora_command, service_env
from sqlalchemy import inspect

from service.db import make_engine
from service.migrate import upgrade_database
from service.models import Base


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_head_on_an_empty_database_matches_the_models(backend, tmp_path):
    with database_url(backend, tmp_path) as url:
        upgrade_database(url)
        upgrade_database(url)  # at head already: a no-op
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                tables = set(inspect(connection).get_table_names())
                assert set(Base.metadata.tables) <= tables and "alembic_version" in tables
                context = MigrationContext.configure(connection, opts={"compare_type": True, "render_as_batch": backend == "sqlite"})
                assert compare_metadata(context, Base.metadata) == []
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_revision_downgrades_and_upgrades_again_keeping_the_rows(backend, tmp_path):
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy.orm import Session

    from service.api.auth import create_tenant
    from service.migrate import alembic_config

    with database_url(backend, tmp_path) as url:
        upgrade_database(url)
        engine = make_engine(url)
        try:
            with Session(engine) as session:
                create_tenant(session, "kept")
            config = alembic_config(url)
            revisions = [r.revision for r in ScriptDirectory.from_config(config).walk_revisions()]  # head first
            for older in revisions[1:]:
                command.downgrade(config, older)
                assert row_counts(engine) == {"tenants": 1, "api_keys": 1}, f"rows lost going down to {older}"
            upgrade_database(url)
            assert row_counts(engine) == {"tenants": 1, "api_keys": 1}
        finally:
            engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0003_adds_the_key_life_cycle_and_its_downgrade_drops_the_keys_0002_could_not_refuse(backend, tmp_path):
    from datetime import timedelta

    from alembic import command
    from sqlalchemy.orm import Session

    from service.api.auth import create_tenant
    from service.keys import create_key, revoke_key
    from service.migrate import alembic_config
    from service.models import utcnow

    life_cycle = {"name", "expires_at", "revoked_at", "last_used_at"}
    with database_url(backend, tmp_path) as url:
        upgrade_database(url)
        engine = make_engine(url)
        try:
            assert life_cycle <= key_columns(engine)
            with Session(engine) as session:
                tenant, _ = create_tenant(session, "life-cycle")
                revoke_key(session, create_key(session, tenant.id, "revoked")[0])
                create_key(session, tenant.id, "expiring", utcnow() + timedelta(days=1))
            command.downgrade(alembic_config(url), "0002")
            assert not life_cycle & key_columns(engine)
            # 0002 would let the revoked and the expiring key in forever: they are gone.
            assert row_counts(engine) == {"tenants": 1, "api_keys": 1}
            upgrade_database(url)
            assert life_cycle <= key_columns(engine)
        finally:
            engine.dispose()


def key_columns(engine) -> set[str]:
    with engine.connect() as connection:
        return {column["name"] for column in inspect(connection).get_columns("api_keys")}


def row_counts(engine) -> dict[str, int]:
    from sqlalchemy import text

    with engine.connect() as connection:
        return {table: connection.scalar(text(f"SELECT count(*) FROM {table}")) for table in ("tenants", "api_keys")}


def test_rlora_migrate_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = subprocess.run(
        rlora_command("migrate"), cwd=REPO, env=service_env(home=tmp_path, database_url=url),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    assert "jobs" in table_names(url)


def test_a_non_editable_install_ships_and_applies_the_migrations(tmp_path):
    """Built from a copy of the sources (no build/ left in the checkout), installed flat."""
    import shutil
    import sys

    source, target = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("rlora", "service", "worker", "migrations"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    shipped = {p.relative_to(target).as_posix() for p in (target / "migrations").rglob("*") if "__pycache__" not in p.parts}
    assert {"migrations/env.py", "migrations/script.py.mako", "migrations/versions/0001_initial_schema.py"} <= shipped

    # The installed copy, not the checkout, applies the schema (cwd away from the repository).
    url = f"sqlite:///{tmp_path / 'installed.db'}"
    code = "import service.migrate as m; print(m.MIGRATIONS_DIR); m.upgrade_database(__import__('sys').argv[1])"
    env = {**service_env(home=tmp_path / "home"), "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code, url], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target / "migrations")
    assert "jobs" in table_names(url)


def table_names(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return inspect(connection).get_table_names()
    finally:
        engine.dispose()
