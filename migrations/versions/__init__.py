# Alembic revisions; Alembic skips this file. A package file only so that it ships in the wheel.
