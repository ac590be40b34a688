"""Hot statements run on the database driver's own connection.

A select() is built with SQLAlchemy as usual, compiled once per dialect, and executed by the driver
(sqlite3 or psycopg) inside the caller's SQLAlchemy transaction. For the indexed reads behind the
examples endpoint, SQLAlchemy's execution path (cache lookup, parameter processing, result
metadata, Row objects) cost more CPU than SQLite spent running the statement. The price: no type
processing, so only plain columns (numbers, text, bytes) belong in these statements, and JSON
columns, read through `json_value`.
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection
from sqlalchemy.sql import Select


class Prepared:
    def __init__(self, stmt: Select):
        self.stmt = stmt
        self._by_dialect: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def rows(self, conn: Connection, params: dict[str, Any]) -> list[tuple]:
        """All rows, as the driver's tuples in the select's column order."""
        compiled = self._by_dialect.get(conn.dialect.name)
        if compiled is None:
            c = self.stmt.compile(dialect=conn.dialect)
            order = tuple(c.positiontup or ()) if c.positional else None
            compiled = self._by_dialect[conn.dialect.name] = (c.string, order)
        sql, order = compiled
        args = tuple(params[name] for name in order) if order is not None else params
        driver = conn.connection.driver_connection
        assert driver is not None, "a checked-out connection has its driver connection"
        cursor = driver.cursor()
        try:
            cursor.execute(sql, args)
            return cursor.fetchall()
        finally:
            cursor.close()


def json_value(value: Any) -> Any:
    """A JSON column as the driver returns it: text from sqlite3, already parsed by psycopg."""
    return orjson.loads(value) if isinstance(value, str) else value
