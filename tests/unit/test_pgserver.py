"""The test PostgreSQL server (tests/pgserver.py): a fresh database per test, bytea and
text round trips, the C collation the store's byte-order keys rely on."""

from __future__ import annotations

import psycopg

from tests.pgserver import PgServer


def test_roundtrip_bytes_and_text(pg_url: str) -> None:
    blobs = [b"", b"\x00\xff\x00", bytes(range(256))]
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, b bytea NOT NULL, s text NOT NULL)")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO t VALUES (%s, %s, %s)",
                [(i, b, f"پنجاب-{i}") for i, b in enumerate(blobs)],
            )
        rows = conn.execute("SELECT id, b, s FROM t ORDER BY id").fetchall()
    assert rows == [(i, b, f"پنجاب-{i}") for i, b in enumerate(blobs)]
    assert all(isinstance(b, bytes) for _, b, _ in rows)


def test_collation_is_c(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT datcollate, datctype, pg_encoding_to_char(encoding)"
            " FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        assert row == ("C", "C", "UTF8")
        # C orders by bytes: "B" (0x42) before "a" (0x61).
        got = conn.execute("SELECT x FROM (VALUES ('a'), ('B')) v(x) ORDER BY x").fetchall()
        assert got == [("B",), ("a",)]


def test_fresh_database_per_test(pg_url: str, pg_server: PgServer) -> None:
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SHOW max_connections").fetchone() == ("200",)
    assert pg_server.url("x").startswith("postgresql:///x?host=/")
