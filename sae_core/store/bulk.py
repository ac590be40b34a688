"""Loading many rows into a table with what the database offers for it.

PostgreSQL: COPY (psycopg's `Cursor.copy`), the server's bulk path: no statement per row or per
batch. SQLite: the driver's `executemany` of one prepared INSERT. Both take plain tuples in the
given column order, already encoded (bytes, JSON text): SQLAlchemy's per-row parameter processing
cost more than the inserts themselves (a 1M-feature run spent most of its write there).
"""

from __future__ import annotations

from itertools import islice
from typing import Iterable, Sequence

from sqlalchemy.orm import Session
from tqdm import tqdm

from .schema import Base

BATCH = 5000  # rows per executemany on SQLite, and between progress updates


def load_rows(
    s: Session, model: type[Base], columns: Sequence[str], rows: Iterable[tuple], total: int = 0, desc: str = "", progress: bool = False
) -> int:
    """Append `rows` to `model`'s table inside the session's transaction; returns the number of rows."""
    conn = s.connection()
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(c) for c in columns)
    bar = tqdm(total=total or None, desc=desc, unit="row", unit_scale=True, disable=not progress, dynamic_ncols=True)
    it, n = iter(rows), 0
    try:
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cur, cur.copy(f"COPY {quote(model.__tablename__)} ({names}) FROM STDIN") as copy:
                while batch := list(islice(it, BATCH)):
                    for row in batch:
                        copy.write_row(row)
                    n += len(batch)
                    bar.update(len(batch))
        else:
            marks = ", ".join("?" if conn.dialect.paramstyle == "qmark" else "%s" for _ in columns)
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            sql = f"INSERT INTO {quote(model.__tablename__)} ({names}) VALUES ({marks})"
            while batch := list(islice(it, BATCH)):
                cursor.executemany(sql, batch)
                n += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()
    return n
