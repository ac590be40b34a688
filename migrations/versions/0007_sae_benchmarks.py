"""sae_benchmarks: the SAE benchmark suite's results (`saescope bench-sae`, issue 28): one row per SAE and
seed with the flat metrics the SAE page and /compare read, the same results as SAEBench BaseEvalOutput
dicts, and the suite's settings. Deleted with the SAE.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 17:05:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sae_benchmarks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('suite_version', sa.String(length=32), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=False),
    sa.Column('results', sa.JSON(), nullable=False),
    sa.Column('saebench', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('computed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sae_id', 'seed', name='uq_sae_benchmarks_sae_seed')
    )
    op.create_index('ix_sae_benchmarks_sae_id', 'sae_benchmarks', ['sae_id'])


def downgrade() -> None:
    op.drop_index('ix_sae_benchmarks_sae_id', table_name='sae_benchmarks')
    op.drop_table('sae_benchmarks')
