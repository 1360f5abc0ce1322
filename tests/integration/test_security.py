"""The hostile review's findings (issue 13), each against the real thing: PostgreSQL, NATS with the
installer's permissions, the running services."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from services.recorder import is_bad_row


def test_a_nul_byte_is_a_bad_row_not_a_database_outage(database):
    """psycopg refuses a NUL in a text value itself, with a DataError that has no SQLSTATE: taken for
    "database away", it held the recorder's batch forever. It is the row's fault, like class 22/23."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (path text PRIMARY KEY)")
        with pytest.raises(psycopg.Error) as nul:
            conn.execute("INSERT INTO t VALUES (%s)", ("x\x00.jpg",))
        assert nul.value.sqlstate is None and is_bad_row(nul.value)
        conn.execute("INSERT INTO t VALUES ('a')")
        with pytest.raises(psycopg.Error) as dup:
            conn.execute("INSERT INTO t VALUES ('a')")
        assert is_bad_row(dup.value)  # 23505
    with pytest.raises(psycopg.OperationalError) as away:
        psycopg.connect(database.rsplit("/", 1)[0] + "/no_such_database", connect_timeout=3)
    assert not is_bad_row(away.value)  # the database's state: hold the batch and wait
