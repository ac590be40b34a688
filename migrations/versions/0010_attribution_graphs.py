"""Attribution graphs (issue 29 items 2, 3): one row per traced prompt's pruned graph, found by its
permalink slug; the table is sae_core/store/schema.py's AttributionGraphRecord.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 20:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('attribution_graphs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('slug', sa.String(length=32), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('model', sa.String(length=512), nullable=False),
    sa.Column('transcoders', sa.String(length=64), nullable=False),
    sa.Column('transcoders_path', sa.Text(), nullable=False),
    sa.Column('layer_folders', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('n_tokens', sa.Integer(), nullable=False),
    sa.Column('nodes_before', sa.Integer(), nullable=False),
    sa.Column('edges_before', sa.Integer(), nullable=False),
    sa.Column('nodes_after', sa.Integer(), nullable=False),
    sa.Column('edges_after', sa.Integer(), nullable=False),
    sa.Column('replacement_score', sa.Float(), nullable=False),
    sa.Column('completeness_score', sa.Float(), nullable=False),
    sa.Column('scores', sa.JSON(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('graph', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('slug')
    )


def downgrade() -> None:
    op.drop_table('attribution_graphs')
