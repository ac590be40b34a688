"""The SQL store: schema (tables), db (engine, migrations, schema check), write (publish a mining run)."""
