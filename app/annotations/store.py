"""Reading and writing annotations and feature lists: plain functions over a SQLAlchemy Connection.

Writes run in app.accounts.store.transaction (READ COMMITTED on PostgreSQL) and call
`sae_core.store.changes.mark_changed` for the annotated SAE, so the cached pages and ETags of that SAE
switch at once, as they do when explanations are written."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

import numpy as np
from markupsafe import Markup
from sqlalchemy import ColumnElement, Connection, and_, delete, func, insert, or_, select, update

from sae_core.errors import NotFound, SaescopeError
from sae_core.store import explanation_search as store_search
from sae_core.store.changes import mark_changed
from sae_core.store.codec import unpack_embeddings
from sae_core.store.schema import SAE, MiningRun

from ..accounts.models import User
from ..accounts.store import aware, utcnow
from . import markdown
from .models import Annotation, AnnotationRevision, FeatureList, FeatureListEntry

VISIBILITY = ("private", "team", "link")
MAX_LABEL = 200
MAX_ENTRIES = 500


class AnnotationError(SaescopeError):
    """A write that cannot be done (empty label, unknown SAE, feature out of range...)."""


def _no_nul(*texts: str) -> None:
    """PostgreSQL stores no NUL character in text: refused alike on both stores."""
    if any("\x00" in t for t in texts):
        raise AnnotationError("text may not contain NUL characters")


@dataclass(frozen=True)
class SaeRef:
    id: int
    name: str
    n_latents: int
    active_run_id: int | None


def sae_ref(conn: Connection, name: str, index: int | None = None) -> SaeRef:
    row = conn.execute(select(SAE.id, SAE.name, SAE.n_latents, SAE.active_run_id).where(SAE.name == name)).first()
    if row is None:
        raise NotFound(f"no SAE named {name!r}")
    ref = SaeRef(*row)
    if index is not None and not 0 <= index < ref.n_latents:
        raise NotFound(f"{name} has {ref.n_latents} features: no #{index}")
    return ref


# ---------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class AnnotationView:
    sae: str
    index: int
    label: str
    note: str
    author: str | None
    created_at: datetime
    updated_at: datetime
    revisions: int
    examples_changed_at: datetime | None  # the active run finished after the note was written: its examples are newer

    @property
    def html(self) -> Markup:
        return markdown.render(self.note)

    def as_dict(self) -> dict:
        return {
            "sae": self.sae,
            "index": self.index,
            "label": self.label,
            "note": self.note,
            "note_html": str(self.html),
            "author": self.author,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "revisions": self.revisions,
            "examples_changed_at": self.examples_changed_at,
        }


def _views(conn: Connection, where: ColumnElement[bool]) -> list[AnnotationView]:
    revisions = select(AnnotationRevision.annotation_id, func.count().label("n")).group_by(AnnotationRevision.annotation_id).subquery()
    rows = conn.execute(
        select(
            SAE.name,
            Annotation.feature_index,
            Annotation.label,
            Annotation.note,
            User.username,
            Annotation.created_at,
            Annotation.updated_at,
            revisions.c.n,
            MiningRun.finished_at,
        )
        .join(SAE, SAE.id == Annotation.sae_id)
        .outerjoin(User, User.id == Annotation.author_id)
        .outerjoin(revisions, revisions.c.annotation_id == Annotation.id)
        .outerjoin(MiningRun, MiningRun.id == SAE.active_run_id)
        .where(where)
        .order_by(SAE.name, Annotation.feature_index)
    ).all()
    out = []
    for name, index, label, note, author, created, updated, n, finished in rows:
        updated, finished = aware(updated), aware(finished)
        changed = finished if finished is not None and updated is not None and finished > updated else None
        out.append(AnnotationView(name, index, label, note, author, aware(created), updated, n or 0, changed))  # type: ignore[arg-type]
    return out


def get_annotation(conn: Connection, sae: str, index: int) -> AnnotationView | None:
    ref = sae_ref(conn, sae, index)
    found = _views(conn, and_(Annotation.sae_id == ref.id, Annotation.feature_index == index))
    return found[0] if found else None


def sae_annotations(conn: Connection, sae: str) -> list[AnnotationView]:
    ref = sae_ref(conn, sae)
    return _views(conn, Annotation.sae_id == ref.id)


def labels(conn: Connection, sae: str, indices: list[int]) -> dict[int, str]:
    """The team's label of each of `indices` that has one: the SAE page's feature table shows them."""
    if not indices:
        return {}
    rows = conn.execute(
        select(Annotation.feature_index, Annotation.label)
        .join(SAE, SAE.id == Annotation.sae_id)
        .where(SAE.name == sae, Annotation.feature_index.in_(indices))
    ).all()
    return {int(i): label for i, label in rows}


def set_annotation(
    conn: Connection, sae: str, index: int, label: str, note: str, author_id: int, embedding: bytes | None = None
) -> AnnotationView:
    """Create or edit the annotation of feature `index` of `sae`; every call appends a revision."""
    _no_nul(label, note, sae)
    label = " ".join(label.split())
    if not label or len(label) > MAX_LABEL:
        raise AnnotationError(f"a label is 1 to {MAX_LABEL} characters")
    if len(note) > markdown.MAX_NOTE:
        raise AnnotationError(f"a note is at most {markdown.MAX_NOTE:,} characters")
    ref = sae_ref(conn, sae, index)
    now = utcnow()
    existing = conn.scalar(select(Annotation.id).where(Annotation.sae_id == ref.id, Annotation.feature_index == index))
    values = {"label": label, "note": note, "author_id": author_id, "updated_at": now, "embedding": embedding}
    if existing is None:
        existing = conn.execute(
            insert(Annotation).values(sae_id=ref.id, feature_index=index, created_at=now, **values).returning(Annotation.id)
        ).scalar_one()
    else:
        conn.execute(update(Annotation).where(Annotation.id == existing).values(**values))
    conn.execute(insert(AnnotationRevision).values(annotation_id=existing, label=label, note=note, author_id=author_id, created_at=now))
    mark_changed(conn, ref.id)
    view = get_annotation(conn, sae, index)
    assert view is not None
    return view


def history(conn: Connection, sae: str, index: int) -> list[dict]:
    """Every revision of the feature's annotation, newest first."""
    ref = sae_ref(conn, sae, index)
    rows = conn.execute(
        select(AnnotationRevision.label, AnnotationRevision.note, User.username, AnnotationRevision.created_at)
        .join(Annotation, Annotation.id == AnnotationRevision.annotation_id)
        .outerjoin(User, User.id == AnnotationRevision.author_id)
        .where(Annotation.sae_id == ref.id, Annotation.feature_index == index)
        .order_by(AnnotationRevision.id.desc())
    ).all()
    return [{"label": r[0], "note": r[1], "author": r[2], "created_at": aware(r[3])} for r in rows]


@dataclass
class AnnotationHit:
    view: AnnotationView
    score: float
    full_text_rank: int | None
    semantic_rank: int | None


def search(
    conn: Connection, query: str, embed_query: Callable[[str], np.ndarray | None] | None, sae: str | None = None, limit: int = 20
) -> list[AnnotationHit]:
    """Annotations whose label or note matches `query`: full text (any of its words, as explanations'
    search, store_search.words) and, where annotations have embeddings, by cosine between theirs and the
    query's (`embed_query`: embedded like explanations, only then); the rankings fused by reciprocal rank (store_search.fuse)."""
    terms = store_search.words(query)
    where = [] if sae is None else [Annotation.sae_id == sae_ref(conn, sae).id]
    rows = conn.execute(select(Annotation.id, Annotation.label, Annotation.note, Annotation.embedding).where(*where)).all()
    text_hits: list[store_search.Match] = []
    if terms:
        scored = []
        for aid, label, note, _ in rows:
            words = store_search.words(f"{label} {label} {note}", limit=100_000)  # the label counts twice
            score = sum(words.count(t) for t in terms) / (1 + len(words)) ** 0.5
            if score > 0:
                scored.append((score, aid))
        scored.sort(key=lambda s: (-s[0], s[1]))
        text_hits = [store_search.Match(aid, "annotation", s) for s, aid in scored[:100]]
    semantic_hits: list[store_search.Match] = []
    embedded = [(r[0], r[3]) for r in rows if r[3]]
    vector = embed_query(query) if embed_query is not None and embedded else None
    if vector is not None:
        matrix = unpack_embeddings([e for _, e in embedded])
        if matrix.shape[1] == len(vector):
            sims = matrix @ vector
            order = np.argsort(-sims, kind="stable")[:100]
            semantic_hits = [store_search.Match(embedded[i][0], "annotation", float(sims[i])) for i in order if sims[i] > 0.2]
    fused = store_search.fuse(text_hits, semantic_hits, limit=limit)
    if not fused:
        return []
    ids = [aid for aid, _ in fused]
    views = {(v.sae, v.index): v for v in _views(conn, Annotation.id.in_(ids))}
    keyed = select(Annotation.id, SAE.name, Annotation.feature_index).join(SAE, SAE.id == Annotation.sae_id).where(Annotation.id.in_(ids))
    keys = {r[0]: (r[1], r[2]) for r in conn.execute(keyed)}
    t_rank = {m.feature_index: i + 1 for i, m in enumerate(text_hits)}
    s_rank = {m.feature_index: i + 1 for i, m in enumerate(semantic_hits)}
    return [AnnotationHit(views[keys[aid]], score, t_rank.get(aid), s_rank.get(aid)) for aid, score in fused if keys.get(aid) in views]


# ---------------------------------------------------------------------- feature lists


@dataclass
class Entry:
    sae: str
    index: int
    note: str = ""


@dataclass
class ListView:
    id: int
    owner_id: int
    owner: str
    name: str
    description: str
    visibility: str
    token: str
    common_text: str
    created_at: datetime
    updated_at: datetime
    entries: list[Entry] = field(default_factory=list)

    def as_dict(self, with_token: bool) -> dict:
        out = {
            "id": self.id,
            "owner": self.owner,
            "name": self.name,
            "description": self.description,
            "visibility": self.visibility,
            "common_text": self.common_text,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "entries": [{"sae": e.sae, "index": e.index, "note": e.note} for e in self.entries],
        }
        if with_token:
            out["share_path"] = f"/lists/shared/{self.token}"
        return out


def _check_list_fields(name: str, visibility: str, description: str, common_text: str) -> str:
    _no_nul(name, visibility, description, common_text)
    name = " ".join(name.split())
    if not name or len(name) > MAX_LABEL:
        raise AnnotationError(f"a list's name is 1 to {MAX_LABEL} characters")
    if visibility not in VISIBILITY:
        raise AnnotationError(f"visibility is one of {', '.join(VISIBILITY)}")
    if len(description) > markdown.MAX_NOTE or len(common_text) > 2000:
        raise AnnotationError("the description is at most 20,000 characters and the common text 2,000")
    return name


def _entries(conn: Connection, entries: list[Entry]) -> list[dict]:
    if len(entries) > MAX_ENTRIES:
        raise AnnotationError(f"a list holds at most {MAX_ENTRIES} features")
    refs: dict[str, SaeRef] = {}
    rows = []
    for pos, e in enumerate(entries):
        _no_nul(e.sae, e.note)
        if e.sae not in refs:
            refs[e.sae] = sae_ref(conn, e.sae)
        ref = refs[e.sae]
        if not 0 <= e.index < ref.n_latents:
            raise NotFound(f"{e.sae} has {ref.n_latents} features: no #{e.index}")
        if len(e.note) > markdown.MAX_NOTE:
            raise AnnotationError(f"an entry's note is at most {markdown.MAX_NOTE:,} characters")
        rows.append({"position": pos, "sae_id": ref.id, "feature_index": e.index, "note": e.note})
    return rows


def create_list(
    conn: Connection, owner_id: int, name: str, description: str = "", visibility: str = "private", common_text: str = "",
    entries: list[Entry] | None = None,
) -> int:  # fmt: skip
    name = _check_list_fields(name, visibility, description, common_text)
    rows = _entries(conn, entries or [])
    now = utcnow()
    list_id = conn.execute(
        insert(FeatureList)
        .values(
            owner_id=owner_id,
            name=name,
            description=description,
            visibility=visibility,
            token=secrets.token_urlsafe(24),
            common_text=common_text,
            created_at=now,
            updated_at=now,
        )
        .returning(FeatureList.id)
    ).scalar_one()
    if rows:
        conn.execute(insert(FeatureListEntry), [{**r, "list_id": list_id} for r in rows])
    return list_id


def _owned(conn: Connection, list_id: int, user_id: int) -> None:
    """Only the owner edits a list; anyone else is told there is no such list (not that it exists)."""
    owner = conn.scalar(select(FeatureList.owner_id).where(FeatureList.id == list_id))
    if owner is None or owner != user_id:
        raise NotFound(f"you have no feature list {list_id}")


def update_list(
    conn: Connection, list_id: int, user_id: int, name: str, description: str, visibility: str, common_text: str,
    entries: list[Entry] | None,
) -> None:  # fmt: skip
    """Replace a list's fields and, if `entries` is given, its entries (in that order)."""
    _owned(conn, list_id, user_id)
    name = _check_list_fields(name, visibility, description, common_text)
    values = {"name": name, "description": description, "visibility": visibility, "common_text": common_text, "updated_at": utcnow()}
    conn.execute(update(FeatureList).where(FeatureList.id == list_id).values(**values))
    if entries is not None:
        rows = _entries(conn, entries)
        conn.execute(delete(FeatureListEntry).where(FeatureListEntry.list_id == list_id))
        if rows:
            conn.execute(insert(FeatureListEntry), [{**r, "list_id": list_id} for r in rows])


def add_entry(conn: Connection, list_id: int, user_id: int, entry: Entry) -> None:
    view = get_list(conn, list_id, user_id)
    update_list(conn, list_id, user_id, view.name, view.description, view.visibility, view.common_text, [*view.entries, entry])


def remove_entry(conn: Connection, list_id: int, user_id: int, position: int) -> None:
    view = get_list(conn, list_id, user_id)
    if not 0 <= position < len(view.entries):
        raise NotFound(f"the list has no entry {position}")
    rest = view.entries[:position] + view.entries[position + 1 :]
    update_list(conn, list_id, user_id, view.name, view.description, view.visibility, view.common_text, rest)


def move_entry(conn: Connection, list_id: int, user_id: int, position: int, to: int) -> None:
    view = get_list(conn, list_id, user_id)
    if not (0 <= position < len(view.entries) and 0 <= to < len(view.entries)):
        raise NotFound("the list has no such entry")
    entries = list(view.entries)
    entries.insert(to, entries.pop(position))
    update_list(conn, list_id, user_id, view.name, view.description, view.visibility, view.common_text, entries)


def delete_list(conn: Connection, list_id: int, user_id: int) -> None:
    _owned(conn, list_id, user_id)
    conn.execute(delete(FeatureList).where(FeatureList.id == list_id))


def _load(conn: Connection, where: ColumnElement[bool]) -> ListView | None:
    row = conn.execute(
        select(
            FeatureList.id,
            FeatureList.owner_id,
            User.username,
            FeatureList.name,
            FeatureList.description,
            FeatureList.visibility,
            FeatureList.token,
            FeatureList.common_text,
            FeatureList.created_at,
            FeatureList.updated_at,
        )
        .join(User, User.id == FeatureList.owner_id)
        .where(where)
    ).first()
    if row is None:
        return None
    view = ListView(*row[:8], aware(row[8]), aware(row[9]))  # type: ignore[arg-type]
    entries = conn.execute(
        select(SAE.name, FeatureListEntry.feature_index, FeatureListEntry.note)
        .join(SAE, SAE.id == FeatureListEntry.sae_id)
        .where(FeatureListEntry.list_id == view.id)
        .order_by(FeatureListEntry.position)
    ).all()
    view.entries = [Entry(*e) for e in entries]
    return view


def get_list(conn: Connection, list_id: int, user_id: int | None) -> ListView:
    """A list the user may see: their own, or a team list (any signed-in user). Others: NotFound."""
    view = _load(conn, FeatureList.id == list_id)
    if view is None or user_id is None or not (view.owner_id == user_id or view.visibility == "team"):
        raise NotFound(f"no feature list {list_id} that you can see")
    return view


def shared_list(conn: Connection, token: str) -> ListView:
    """A list by its public link (only while it is shared by link)."""
    view = _load(conn, FeatureList.token == token)
    if view is None or view.visibility != "link":
        raise NotFound("no feature list is shared at this link")
    return view


def lists_for(conn: Connection, user_id: int) -> list[dict]:
    """The user's own lists and the team's, newest first."""
    counts = select(FeatureListEntry.list_id, func.count().label("n")).group_by(FeatureListEntry.list_id).subquery()
    rows = conn.execute(
        select(FeatureList.id, FeatureList.name, FeatureList.visibility, User.username, FeatureList.updated_at, counts.c.n)
        .join(User, User.id == FeatureList.owner_id)
        .outerjoin(counts, counts.c.list_id == FeatureList.id)
        .where(or_(FeatureList.owner_id == user_id, FeatureList.visibility == "team"))
        .order_by(FeatureList.updated_at.desc(), FeatureList.id.desc())
    ).all()
    return [
        {"id": r[0], "name": r[1], "visibility": r[2], "owner": r[3], "updated_at": aware(r[4]), "entries": r[5] or 0, "mine": None}
        for r in rows
    ]
