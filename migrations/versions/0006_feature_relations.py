"""Feature relations: features.coactivation (each feature's top co-firing features, counted while mining)
and feature_relations (families across SAE widths, "split", and the same feature across seeds,
"match"; sae_core/relations/families.py). Runs mined before this revision have no co-activation
(NULL) until they are mined again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 14:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('features', sa.Column('coactivation', sa.JSON(), nullable=True))
    op.create_table('feature_relations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('source_run_id', sa.Integer(), nullable=False),
    sa.Column('source_feature', sa.Integer(), nullable=False),
    sa.Column('target_run_id', sa.Integer(), nullable=False),
    sa.Column('target_feature', sa.Integer(), nullable=False),
    sa.Column('cosine', sa.Float(), nullable=False),
    sa.Column('coactivation', sa.Float(), nullable=False),
    sa.Column('co_fired', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['source_run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['target_run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_feature_relations_source', 'feature_relations', ['source_run_id', 'source_feature'])
    op.create_index('ix_feature_relations_target', 'feature_relations', ['target_run_id', 'target_feature'])


def downgrade() -> None:
    op.drop_index('ix_feature_relations_target', table_name='feature_relations')
    op.drop_index('ix_feature_relations_source', table_name='feature_relations')
    op.drop_table('feature_relations')
    with op.batch_alter_table('features') as batch:
        batch.drop_column('coactivation')
