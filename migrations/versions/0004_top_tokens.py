"""features.top_token_id: the token each feature's strongest top context peaks on, and each entry of
features.neighbours gains that neighbour's top token ([index, cosine, top_token_id]). The feature
page and the SAE table read them from the feature rows instead of decoding every listed feature's
first top context (a second query: a fifth of a feature page's store time). Existing runs are filled
in from their examples.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 23:40:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

BATCH = 5000  # feature rows read and rewritten at a time
features = sa.table('features', sa.column('run_id', sa.Integer), sa.column('feature_index', sa.Integer),
                    sa.column('neighbours', sa.JSON), sa.column('top_token_id', sa.Integer))
examples = sa.table('examples', sa.column('run_id', sa.Integer), sa.column('feature_index', sa.Integer), sa.column('kind', sa.String),
                    sa.column('rank', sa.Integer), sa.column('token_ids', sa.LargeBinary), sa.column('max_pos', sa.Integer))
_UPDATE = (
    sa.update(features)
    .where(features.c.run_id == sa.bindparam('r'), features.c.feature_index == sa.bindparam('f'))
    .values(neighbours=sa.bindparam('n', type_=sa.JSON), top_token_id=sa.bindparam('t'))
)


def _token_at(blob: bytes, position: int) -> int:
    """The token id at `position` of examples.token_ids, little-endian int32 as stored at this revision
    (sae_core/store/codec.py); written out here so that the migration keeps its meaning if the codec changes."""
    return int.from_bytes(blob[4 * position: 4 * position + 4], 'little', signed=True)


def _rewrite(neighbours_of) -> None:
    """Every run's feature rows, BATCH at a time: top_token_id and neighbours set from
    `neighbours_of(run's top tokens, feature index, neighbours)` -> (neighbours, top token)."""
    conn = op.get_bind()
    for run_id in conn.execute(sa.select(features.c.run_id).distinct()).scalars().all():
        rows = conn.execute(sa.select(examples.c.feature_index, examples.c.token_ids, examples.c.max_pos).where(
            examples.c.run_id == run_id, examples.c.kind == 'top', examples.c.rank == 0))
        top = {f: _token_at(ids, pos) for f, ids, pos in rows}
        last = conn.execute(sa.select(sa.func.max(features.c.feature_index)).where(features.c.run_id == run_id)).scalar()
        for lo in range(0, (last or 0) + 1, BATCH):
            batch = conn.execute(sa.select(features.c.feature_index, features.c.neighbours).where(
                features.c.run_id == run_id, features.c.feature_index >= lo, features.c.feature_index < lo + BATCH)).all()
            params = []
            for f, near in batch:
                near, token = neighbours_of(top, f, near or [])
                params.append({'r': run_id, 'f': f, 'n': near, 't': token})
            if params:
                conn.execute(_UPDATE, params)


def upgrade() -> None:
    op.add_column('features', sa.Column('top_token_id', sa.Integer(), nullable=True))
    _rewrite(lambda top, f, near: ([[n[0], n[1], top.get(n[0])] for n in near], top.get(f)))


def downgrade() -> None:
    _rewrite(lambda top, f, near: ([[n[0], n[1]] for n in near], None))
    with op.batch_alter_table('features') as batch:
        batch.drop_column('top_token_id')
