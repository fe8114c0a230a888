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


def test_rlora_migrate_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = subprocess.run(
        rlora_command("migrate"), cwd=REPO, env=service_env(home=tmp_path, database_url=url),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "database at head" in result.stdout
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert "jobs" in inspect(connection).get_table_names()
    finally:
        engine.dispose()
