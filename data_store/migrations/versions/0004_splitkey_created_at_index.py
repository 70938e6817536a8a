"""index splitkey.created_at: one approval compares its prompt with the most recent split keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 04:45:00
"""
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_splitkey_created_at', 'splitkey', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_splitkey_created_at', table_name='splitkey')
