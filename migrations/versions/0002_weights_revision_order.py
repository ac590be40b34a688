"""run_weights: the SAE weights each mining run was mined with, so that a server with no shared disk
(the docker-compose app container) can run the SAE live from the store alone; saes.revision: bumped
by every write that changes what an SAE's pages show, so validators and cached pages follow it;
feature_order: checkpoints of each run's sorted feature table, and the features' sort indexes with
the feature index as tie-break, so any page of the table is a range of an index (store/order.py)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('run_weights',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('format', sa.String(length=32), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('n_bytes', sa.BigInteger(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id')
    )
    op.add_column('saes', sa.Column('revision', sa.Integer(), server_default='0', nullable=False))
    op.create_table('feature_order',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('sort', sa.String(length=16), nullable=False),
    sa.Column('filter', sa.String(length=8), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'sort', 'filter', 'position')
    )
    for name, column in (('ix_features_run_density', 'density'), ('ix_features_run_max', 'max_act')):
        op.drop_index(name, table_name='features')
        op.create_index(name, 'features', ['run_id', column, 'feature_index'], unique=False)


def downgrade() -> None:
    for name, column in (('ix_features_run_density', 'density'), ('ix_features_run_max', 'max_act')):
        op.drop_index(name, table_name='features')
        op.create_index(name, 'features', ['run_id', column], unique=False)
    op.drop_table('feature_order')
    with op.batch_alter_table('saes') as batch:
        batch.drop_column('revision')
    op.drop_table('run_weights')
