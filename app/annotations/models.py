"""The tables of annotations and feature lists, on the store's declarative Base (migration 0009).

saes ─< annotations ─< annotation_revisions     one annotation per (SAE, feature index); every edit a revision
users ─< feature_lists ─< feature_list_entries  entries point at (SAE, feature index), ordered by position
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from sae_core.store.schema import Base, utcnow

from ..accounts import models as _accounts  # noqa: F401 - users must be on the metadata first


class Annotation(Base):
    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(primary_key=True)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    feature_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")  # Markdown, rendered and sanitised on display (markdown.py)
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))  # the last editor
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the label and note embedded like explanations (sae_core/explain/embed.py), for search by meaning
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (UniqueConstraint("sae_id", "feature_index", name="uq_annotations_feature"),)


class AnnotationRevision(Base):
    """Append-only: what an annotation said after each edit, by whom, when."""

    __tablename__ = "annotation_revisions"
    id: Mapped[int] = mapped_column(primary_key=True)
    annotation_id: Mapped[int] = mapped_column(ForeignKey("annotations.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(200))
    note: Mapped[str] = mapped_column(Text, default="")
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FeatureList(Base):
    __tablename__ = "feature_lists"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    visibility: Mapped[str] = mapped_column(String(8), default="private")  # private | team | link
    token: Mapped[str] = mapped_column(String(64), unique=True)  # the public link's secret (secrets.token_urlsafe)
    common_text: Mapped[str] = mapped_column(Text, default="")  # the text every entry's activation is shown on
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FeatureListEntry(Base):
    __tablename__ = "feature_list_entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    list_id: Mapped[int] = mapped_column(ForeignKey("feature_lists.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id", ondelete="CASCADE"))
    feature_index: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(Text, default="")
