"""api_keys: name, expires_at, revoked_at, last_used_at, for keys with a life cycle.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


# Plain ALTER TABLE on both databases, as in 0002 (a batch operation would copy and drop the
# table on SQLite).
COLUMNS = ('name', 'expires_at', 'revoked_at', 'last_used_at')


def upgrade() -> None:
    op.add_column('api_keys', sa.Column('name', sa.String(length=200), nullable=True))
    op.add_column('api_keys', sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_keys', sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('api_keys', sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # 0002 cannot refuse a key: without these columns a revoked or expiring key would work
    # again, forever. Such keys go, before the columns that say what they are.
    op.execute(sa.text('DELETE FROM api_keys WHERE revoked_at IS NOT NULL OR expires_at IS NOT NULL'))
    for column in reversed(COLUMNS):
        op.drop_column('api_keys', column)
