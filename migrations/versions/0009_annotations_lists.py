"""Annotations (a label and a Markdown note per SAE feature, with an append-only history) and feature
lists (named, ordered sets of features across SAEs, with a note per entry). Issue 31, items 2 and 3; the
tables are app/annotations/models.py's.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 18:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('annotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('author_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('embedding', sa.LargeBinary(), nullable=True),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sae_id', 'feature_index', name='uq_annotations_feature')
    )
    op.create_table('annotation_revisions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('annotation_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.Column('author_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['annotation_id'], ['annotations.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_annotation_revisions_annotation_id', 'annotation_revisions', ['annotation_id'])
    op.create_table('feature_lists',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('visibility', sa.String(length=8), nullable=False),
    sa.Column('token', sa.String(length=64), nullable=False),
    sa.Column('common_text', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token')
    )
    op.create_index('ix_feature_lists_owner_id', 'feature_lists', ['owner_id'])
    op.create_table('feature_list_entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('list_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('sae_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('note', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['list_id'], ['feature_lists.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['sae_id'], ['saes.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_feature_list_entries_list_id', 'feature_list_entries', ['list_id'])


def downgrade() -> None:
    op.drop_index('ix_feature_list_entries_list_id', table_name='feature_list_entries')
    op.drop_table('feature_list_entries')
    op.drop_index('ix_feature_lists_owner_id', table_name='feature_lists')
    op.drop_table('feature_lists')
    op.drop_index('ix_annotation_revisions_annotation_id', table_name='annotation_revisions')
    op.drop_table('annotation_revisions')
    op.drop_table('annotations')
