"""jobs.phase: what a running job is doing (preparing, training, evaluating, saving).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 09:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


# Plain ALTER TABLE, as 0002: a batch operation would copy and drop the jobs table on SQLite.


def upgrade() -> None:
    op.add_column('jobs', sa.Column('phase', sa.String(length=16), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'phase')
