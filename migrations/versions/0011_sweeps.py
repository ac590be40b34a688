"""Stored strength sweeps (issue 30 item 3: sweeps "are stored with a permalink"): one row per finished
sweep and mining run, found by the digest of its canonical request; the table is
sae_core/store/schema.py's SweepRecord.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 22:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('sweeps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('sae', sa.String(length=200), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('result', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', 'run_id', name='uq_sweeps_key_run')
    )
    op.create_index('ix_sweeps_key', 'sweeps', ['key'])


def downgrade() -> None:
    op.drop_index('ix_sweeps_key', table_name='sweeps')
    op.drop_table('sweeps')
