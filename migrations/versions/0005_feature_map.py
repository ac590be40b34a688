"""feature_maps and feature_map_points: a 2-D map (UMAP of decoder rows, cosine) of a mining run's alive
features. One feature_maps row per run says how the map was made (seed, parameters, when) and holds a
coarse density grid of the points (what a feature page's inset draws); one feature_map_points row per
alive feature holds its coordinates, its cluster (-1: noise) and its nearest features on the map (the
page's map neighbourhood, computed once with the map instead of a spatial query per page view). Keyed
by the run, so a map always describes the run whose pages link to, and goes with it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 13:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('feature_maps',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('n_points', sa.Integer(), nullable=False),
    sa.Column('n_clusters', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('grid', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id')
    )
    op.create_table('feature_map_points',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('x', sa.Float(), nullable=False),
    sa.Column('y', sa.Float(), nullable=False),
    sa.Column('cluster', sa.Integer(), nullable=False),
    sa.Column('neighbours', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['feature_maps.run_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'feature_index')
    )


def downgrade() -> None:
    op.drop_table('feature_map_points')
    op.drop_table('feature_maps')
