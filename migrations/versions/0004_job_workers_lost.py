"""jobs.workers_lost: attempts whose worker was lost, to cap a job's retries.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 07:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


# Plain ALTER TABLE, as 0002: a batch operation would copy and drop the jobs table on SQLite.


def upgrade() -> None:
    op.add_column('jobs', sa.Column('workers_lost', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    op.drop_column('jobs', 'workers_lost')
