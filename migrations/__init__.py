"""The Alembic migrations of the service's schema.

A package only so that it ships in the wheel beside ``service/`` (``service/migrate.py``
finds it there, and in a source checkout); Alembic loads ``env.py`` and ``versions/`` by path.
"""
