"""one running cycle per database: a partial unique index on trainingrun.status = 'running', and the owner process

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:40:00
"""
import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    with op.batch_alter_table('trainingrun', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
    # The index below admits one running row: any older extras belonged to processes of a version
    # that could not tell whether they still lived.
    op.execute("UPDATE trainingrun SET status = 'failed', reason = 'marked failed by the upgrade to one running "
               "cycle per database: another cycle was also running' WHERE status = 'running' AND id <> "
               "(SELECT MAX(id) FROM trainingrun WHERE status = 'running')")
    op.create_index('uq_trainingrun_one_running', 'trainingrun', ['status'], unique=True,
                    sqlite_where=RUNNING, postgresql_where=RUNNING)


def downgrade() -> None:
    op.drop_index('uq_trainingrun_one_running', table_name='trainingrun')
    with op.batch_alter_table('trainingrun', schema=None) as batch_op:
        batch_op.drop_column('owner')
