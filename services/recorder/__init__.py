"""recorder: every stream into PostgreSQL (service.py; the schema migrations in schema/)."""
