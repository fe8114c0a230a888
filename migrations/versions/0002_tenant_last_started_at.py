"""tenants.last_started_at: when a tenant's job last started, for fair scheduling.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 04:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


# Plain ALTER TABLE on both databases (SQLite >= 3.35 drops columns): a batch operation would
# copy and drop the tenants table on SQLite, and with foreign keys on, the drop cascades to
# every tenant's keys, files, jobs and adapters.


def upgrade() -> None:
    op.add_column('tenants', sa.Column('last_started_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('tenants', 'last_started_at')
