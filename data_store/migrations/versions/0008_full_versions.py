"""versions of a kind: LoRA adapters, or full fine-tunes served by a vLLM of their own

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 02:00:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('adapter', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False, server_default='lora'))


def downgrade() -> None:
    with op.batch_alter_table('adapter', schema=None) as batch_op:
        batch_op.drop_column('kind')
