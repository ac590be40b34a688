"""initial schema: models, vocab, saes, mining_runs, features, examples, token_features

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 03:41:47.129600
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # saes.active_run_id and mining_runs.sae_id point at each other: SQLite takes the forward
    # reference inline, PostgreSQL gets the constraint once both tables exist.
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=512), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('n_layers', sa.Integer(), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('saes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('hook', sa.String(length=200), nullable=False),
    sa.Column('architecture', sa.String(length=32), nullable=False),
    sa.Column('d_in', sa.Integer(), nullable=False),
    sa.Column('n_latents', sa.Integer(), nullable=False),
    sa.Column('k', sa.Integer(), nullable=True),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('train_config', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('active_run_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    *([sa.ForeignKeyConstraint(['active_run_id'], ['mining_runs.id'], ondelete='SET NULL')] if sqlite else []),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('vocab',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'token_id')
    )
    op.create_table('mining_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('corpus', sa.Text(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('mining_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_mining_runs_sae_id'), ['sae_id'], unique=False)
    if not sqlite:
        op.create_foreign_key('fk_saes_active_run_id', 'saes', 'mining_runs', ['active_run_id'], ['id'], ondelete='SET NULL')

    op.create_table('examples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('interval', sa.Integer(), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('doc_id', sa.Text(), nullable=False),
    sa.Column('doc_offset', sa.Integer(), nullable=False),
    sa.Column('token_ids', sa.LargeBinary(), nullable=False),
    sa.Column('acts', sa.LargeBinary(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('max_pos', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('examples', schema=None) as batch_op:
        batch_op.create_index('ix_examples_lookup', ['run_id', 'feature_index', 'kind', 'interval', 'rank'], unique=False)

    op.create_table('features',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('n_fired', sa.Integer(), nullable=False),
    sa.Column('density', sa.Float(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('mean_act', sa.Float(), nullable=False),
    sa.Column('histogram', sa.JSON(), nullable=False),
    sa.Column('intervals', sa.JSON(), nullable=False),
    sa.Column('logits', sa.JSON(), nullable=False),
    sa.Column('neighbours', sa.JSON(), nullable=False),
    sa.Column('explanation', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'feature_index')
    )
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.create_index('ix_features_run_density', ['run_id', 'density'], unique=False)
        batch_op.create_index('ix_features_run_max', ['run_id', 'max_act'], unique=False)

    op.create_table('token_features',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('n_examples', sa.Integer(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'token_id', 'feature_index')
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint('fk_saes_active_run_id', 'saes', type_='foreignkey')
    op.drop_table('token_features')
    with op.batch_alter_table('features', schema=None) as batch_op:
        batch_op.drop_index('ix_features_run_max')
        batch_op.drop_index('ix_features_run_density')

    op.drop_table('features')
    with op.batch_alter_table('examples', schema=None) as batch_op:
        batch_op.drop_index('ix_examples_lookup')

    op.drop_table('examples')
    with op.batch_alter_table('mining_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mining_runs_sae_id'))

    op.drop_table('mining_runs')
    op.drop_table('vocab')
    op.drop_table('saes')
    op.drop_table('models')
