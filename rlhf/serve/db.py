"""The served answers and the feedback on them, in a real database through SQLAlchemy.

    store = FeedbackStore("sqlite:////abs/runs/x/serve/feedback.db")   # or postgresql+psycopg://...
    store.create_tables()                                               # once, by `rlhf serve`
    store.log_response(row)                                             # every served answer
    store.add_feedback(fb)                                              # "stored" or "duplicate"

Two append-only tables: `responses` (prompt, answer, model version; the prompt's key groups answers
to the same prompt) and `feedback` (the client's id is the primary key). Nothing is ever updated or
deleted. A retried feedback with the same id and the same content is a no-op ("duplicate"); the same
id with other content is refused (`FeedbackConflict`), so a client retry can never double-count.

SQLite is the embedded default: WAL mode (readers never block the writer), synchronous=FULL (a
committed row survives a crash) and a 30 s busy timeout (concurrent writers from several threads or
replicas on one machine wait instead of failing). Replicas on several nodes cannot share a SQLite
file: give them a PostgreSQL URL.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    create_engine,
    event,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from rlhf.serve.protocol import Feedback

metadata = MetaData()

_JSON_MARK = "\x1bjson:"  # starts a value stored as JSON (see _TextKeepingNul)


class _TextKeepingNul(TypeDecorator):
    """Text that may hold NUL characters, which PostgreSQL refuses in text columns (a byte-level
    model can answer one). Such a value, or one that starts with the mark, is stored as the mark
    plus its JSON (which escapes NUL); every other value, old rows included, as it is."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if value is not None and ("\x00" in value or value.startswith(_JSON_MARK)):
            return _JSON_MARK + json.dumps(value)
        return value

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        if value is not None and value.startswith(_JSON_MARK):
            return json.loads(value[len(_JSON_MARK) :])
        return value


responses = Table(
    "responses",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("model_version", String(200), nullable=False),
    Column("endpoint", String(16), nullable=False),  # chat | completion
    Column("prompt", Text, nullable=False),  # JSON: chat turns or the completion's text
    Column("prompt_key", String(64), nullable=False, index=True),
    Column("answer", _TextKeepingNul, nullable=False),
    Column("finish_reason", String(16), nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("params", Text, nullable=False),  # JSON: max_tokens, temperature, top_p, seed
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", String(128), primary_key=True),  # the client's id: retries are idempotent
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("rater", String(128)),
    Column("payload", Text, nullable=False),  # Feedback.canonical()
)


class FeedbackConflict(ValueError):
    """A feedback id that is already stored with different content."""


class DatabaseError(RuntimeError):
    """The database cannot be reached or used (bad URL, server down, unwritable file)."""


def default_url(run_dir: str | Path) -> str:
    """SQLite under the run's folder: <run dir>/serve/feedback.db (absolute, for any replica)."""
    return f"sqlite:///{(Path(run_dir) / 'serve' / 'feedback.db').resolve()}"


def prompt_key(endpoint: str, prompt: Any) -> str:
    """Answers with the same key answer the same prompt (what ratings and comparisons compare)."""
    blob = json.dumps([endpoint, prompt], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def connect(url: str) -> Engine:
    """An engine for `url`; SQLite gets its folder created and the pragmas above."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pool_pre_ping: a replica outlives server restarts; a dead pooled connection is replaced.
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported as such by the caller
        return "<unparsable URL>"


class FeedbackStore:
    def __init__(self, url: str) -> None:
        try:
            self.engine = connect(url)
        except (SQLAlchemyError, ValueError, ImportError, OSError) as exc:
            raise DatabaseError(f"database URL {redact(url)}: {exc}") from None
        self.url = url

    def create_tables(self) -> None:
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            msg = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0]
            raise DatabaseError(f"database {redact(self.url)}: {msg}") from None

    def log_response(self, row: dict[str, Any]) -> None:
        """One served answer (keys: the `responses` columns but created_at and prompt_key)."""
        values = dict(row)
        values["prompt_key"] = prompt_key(row["endpoint"], row["prompt"])
        values["prompt"] = json.dumps(row["prompt"], ensure_ascii=False)
        values["params"] = json.dumps(row["params"], sort_keys=True)
        values["created_at"] = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            conn.execute(insert(responses).values(**values))

    def prompt_keys(self, ids: list[str]) -> dict[str, str]:
        """response id -> prompt key, for the ids that exist."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(responses.c.id, responses.c.prompt_key).where(responses.c.id.in_(ids))
            )
            return {rid: key for rid, key in rows}

    def add_feedback(self, fb: Feedback) -> str:
        """Store `fb`: "stored", or "duplicate" when this exact feedback is already there."""
        payload = fb.canonical()
        row = dict(
            id=fb.id,
            created_at=datetime.now(timezone.utc),
            kind=fb.kind,
            rater=fb.rater,
            payload=payload,
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(feedback).values(**row))
            return "stored"
        except IntegrityError:
            pass
        with self.engine.connect() as conn:
            stored = conn.execute(
                select(feedback.c.payload).where(feedback.c.id == fb.id)
            ).scalar_one_or_none()
        if stored == payload:
            return "duplicate"
        raise FeedbackConflict(f"id {fb.id!r} is already used by a different feedback")

    def all_responses(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(responses).order_by(responses.c.created_at)).mappings()
            out = [dict(r) for r in rows]
        for r in out:
            r["prompt"] = json.loads(r["prompt"])
        return out

    def all_feedback(self) -> list[Feedback]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback.c.payload).order_by(feedback.c.created_at))
            return [Feedback(**json.loads(payload)) for (payload,) in rows]

    def count(self, table: str) -> int:
        from sqlalchemy import func

        target = {"responses": responses, "feedback": feedback}[table]
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(target)).scalar_one()
