"""canaries: a version serving a share of new conversations, and the arm each conversation got

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 23:40:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        'canary',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('candidate', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('control', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column('share', sa.Float(), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=True),
        sa.Column('started_by', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column('last_check', sa.JSON(), nullable=False),
        sa.Column('decision', sa.JSON(), nullable=False),
        sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('ended_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['candidate'], ['adapter.name']),
        sa.ForeignKeyConstraint(['run_id'], ['trainingrun.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('uq_canary_one_running', 'canary', ['status'], unique=True, sqlite_where=RUNNING, postgresql_where=RUNNING)
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('canary_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('arm', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=True))
        batch_op.create_index(batch_op.f('ix_conversation_canary_id'), ['canary_id'], unique=False)
        batch_op.create_foreign_key('fk_conversation_canary_id', 'canary', ['canary_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('conversation', schema=None) as batch_op:
        batch_op.drop_constraint('fk_conversation_canary_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_conversation_canary_id'))
        batch_op.drop_column('arm')
        batch_op.drop_column('canary_id')
    op.drop_index('uq_canary_one_running', table_name='canary')
    op.drop_table('canary')
