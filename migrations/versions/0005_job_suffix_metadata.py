"""jobs.suffix and jobs.user_metadata: what an OpenAI fine-tuning job request names its job.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 09:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


# Plain ALTER TABLE, as 0002: a batch operation would copy and drop the jobs table on SQLite.


def upgrade() -> None:
    op.add_column('jobs', sa.Column('suffix', sa.String(length=64), nullable=True))
    op.add_column('jobs', sa.Column('user_metadata', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'user_metadata')
    op.drop_column('jobs', 'suffix')
