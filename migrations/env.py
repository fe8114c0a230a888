"""Alembic environment: the service's models, its database URL, a lock against racing upgrades."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

from service.db import make_engine
from service.models import Base
from service.settings import Settings

config = context.config
if config.config_file_name is not None and config.attributes.get("url") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

URL = config.attributes.get("url") or Settings().database
# Several API processes may start at once against one PostgreSQL: the first to take this
# lock upgrades, the others then find the schema at head.
ADVISORY_LOCK_ID = 0x726C6F7261


def run_offline() -> None:
    context.configure(url=URL, target_metadata=Base.metadata, literal_binds=True, render_as_batch=URL.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(URL)
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": ADVISORY_LOCK_ID})
                connection.commit()
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                # SQLite cannot ALTER most things; batch mode copies the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": ADVISORY_LOCK_ID})
                connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
