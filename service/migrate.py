"""Applying the Alembic migrations in ``migrations/`` to a database.

``migrations/`` is a sibling of ``service/`` both in a source checkout (or an editable
install) and in an installed wheel, where it ships as the package ``migrations`` with
its ``script.py.mako`` (pyproject.toml). No ``alembic.ini`` is needed: the configuration is
built here; the repository's ``alembic.ini`` is for running ``alembic`` by hand.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(f"the Alembic migrations are missing: no env.py in {MIGRATIONS_DIR} (a broken install?)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an ini option, so '%' in a password needs no escaping.
    config.attributes["url"] = url
    return config


def upgrade_database(url: str) -> None:
    command.upgrade(alembic_config(url), "head")
