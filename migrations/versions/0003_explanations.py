"""explanations: per feature and method (N2G, LLM) an explanation with its scores, the text full-text
search reads (SQLite: an FTS5 table kept in step by triggers; PostgreSQL: a GIN index over its
tsvector) and its sentence embedding

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# SQLite: an external-content FTS5 table over explanations.search_text (the documented pattern:
# triggers keep it in step with inserts, deletes, updates and ON DELETE CASCADE from mining_runs).
# Porter stemming, so "whaling" finds "whale"; PostgreSQL's 'english' configuration stems the same way.
SQLITE_FTS = [
    "CREATE VIRTUAL TABLE explanations_fts USING fts5(search_text, content='explanations', content_rowid='id', "
    "tokenize='porter unicode61')",
    "CREATE TRIGGER explanations_fts_insert AFTER INSERT ON explanations BEGIN "
    "INSERT INTO explanations_fts(rowid, search_text) VALUES (new.id, new.search_text); END",
    "CREATE TRIGGER explanations_fts_delete AFTER DELETE ON explanations BEGIN "
    "INSERT INTO explanations_fts(explanations_fts, rowid, search_text) VALUES ('delete', old.id, old.search_text); END",
    "CREATE TRIGGER explanations_fts_update AFTER UPDATE OF search_text ON explanations BEGIN "
    "INSERT INTO explanations_fts(explanations_fts, rowid, search_text) VALUES ('delete', old.id, old.search_text); "
    "INSERT INTO explanations_fts(rowid, search_text) VALUES (new.id, new.search_text); END",
]


def upgrade() -> None:
    op.create_table('explanations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feature_index', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(length=16), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('patterns', sa.JSON(), nullable=False),
    sa.Column('precision', sa.Float(), nullable=True),
    sa.Column('recall', sa.Float(), nullable=True),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('scores', sa.JSON(), nullable=False),
    sa.Column('search_text', sa.Text(), nullable=False),
    sa.Column('embedding', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['mining_runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'feature_index', 'method', name='uq_explanations_feature_method')
    )
    op.create_index('ix_explanations_run_method_score', 'explanations', ['run_id', 'method', 'score'], unique=False)
    if op.get_bind().dialect.name == 'postgresql':
        op.create_index('ix_explanations_fts', 'explanations', [sa.text("to_tsvector('english', search_text)")],
                        unique=False, postgresql_using='gin')
    else:
        for statement in SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_explanations_fts', table_name='explanations')
    else:
        for name in ('explanations_fts_insert', 'explanations_fts_delete', 'explanations_fts_update'):
            op.execute(f'DROP TRIGGER IF EXISTS {name}')
        op.execute('DROP TABLE IF EXISTS explanations_fts')
    op.drop_index('ix_explanations_run_method_score', table_name='explanations')
    op.drop_table('explanations')
