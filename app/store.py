"""Metadata store: one row per image file with its vector (SQLAlchemy 2.0; SQLite or PostgreSQL)."""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Select,
    String,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

from app.errors import NotFound, StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
#: columns added to existing tables after version 1, in order: (version, table, column, SQL type).
#: New tables (version 3: image_tags) need no entry: create_all makes them before _migrate runs; new indexes of
#: existing tables (versions 4 to 6) are in _INDEX_VERSIONS.
_MIGRATIONS = [
    (2, "images", "phash", "BIGINT"),
    (2, "images", "dhash", "BIGINT"),
    (2, "images", "phash_mirror", "BIGINT"),
    (2, "images", "dhash_mirror", "BIGINT"),
    (3, "images", "tags_key", "VARCHAR(64)"),
]
#: the schema version that added each index of the images table (ImageRow's __table_args__): create_all makes them
#: in a new database, _migrate in an older one.
_INDEX_VERSIONS = {"ix_images_status_model": 4, "ix_images_status_hashes": 5, "ix_images_status_model_tags": 6}
HASH_FIELDS = ("phash", "dhash", "phash_mirror", "dhash_mirror")
#: ids per statement of Store.get_many (its SQL is compiled once per number of ids, up to this many)
GET_MANY_CHUNK = 500


class ImageStatus(enum.StrEnum):
    INDEXED = "indexed"
    FAILED = "failed"
    DELETED = "deleted"


class TagKind(enum.StrEnum):
    """A zero-shot label of an image: a descriptive tag, or a safe-search flag."""

    TAG = "tag"
    FLAG = "flag"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "clipsearch_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ImageRow(Base):
    __tablename__ = "images"
    # Counting a model's indexed images (count_indexed: the service's readiness waits for it, once per index it
    # loads) reads only this index: without it, every row with its vector, 3.0 s instead of 0.1 at 1M images.
    # Reading the perceptual hashes of the catalog (iter_hashes: the duplicate look-up's hash index) in id order reads
    # only this one: its query takes 0.6 s at 1M images that all have hashes (0.08 s instead of 2.7-5.0 s at 1M
    # images without, where the table's every row and vector was read to find none).
    __table_args__ = (
        Index("ix_images_status_model", "status", "model"),
        Index("ix_images_status_hashes", "status", "id", *HASH_FIELDS),
        # Finding the images whose tags are stale (ids_to_tag, at every index run) reads only this one: 0.07 s
        # instead of 1.2 s at 1M images whose tags are all current.
        Index("ix_images_status_model_tags", "status", "model", "tags_key", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True, index=True)
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(1024))
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    # 64-bit perceptual hashes (stored signed; see hash_to_db), of the image and of its mirror image
    phash: Mapped[int | None] = mapped_column(BigInteger)
    dhash: Mapped[int | None] = mapped_column(BigInteger)
    phash_mirror: Mapped[int | None] = mapped_column(BigInteger)
    dhash_mirror: Mapped[int | None] = mapped_column(BigInteger)
    #: what the stored tags and flags were computed with (see app.tagging); None: not tagged since the vector changed
    tags_key: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ImageTagRow(Base):
    """One tag or flag of an image, with its score; only those above their threshold are stored."""

    __tablename__ = "image_tags"
    # The primary key leads with image_id, so it is also the index for "the tags of these images".
    __table_args__ = (Index("ix_image_tags_kind_label", "kind", "label", "image_id"),)

    image_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    label: Mapped[str] = mapped_column(String(300), primary_key=True)
    score: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class StoredTag:
    kind: str
    label: str
    score: float


@dataclass(frozen=True)
class ImageLabels:
    """What search needs of an image's labels: its tags (names) and whether any flag is set."""

    tags: frozenset[str] = frozenset()
    flagged: bool = False


class FileState(NamedTuple):
    """What the store knows of a path, enough to decide whether it changed. A named tuple: ``file_states`` makes
    one per known path at every index run (1M in 0.3 s, where a frozen dataclass took 2.7 s)."""

    id: int
    path: str
    size: int
    mtime: float
    sha256: str | None
    status: str
    model: str | None
    has_hashes: bool = True


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    width: int | None
    height: int | None
    format: str | None
    size: int
    mtime: float
    status: str
    error: str | None
    sha256: str | None


@dataclass
class ImageResult:
    """The outcome of processing one file, written by ``Store.save_results``."""

    path: str
    size: int
    mtime: float
    sha256: str | None
    status: ImageStatus
    width: int | None = None
    height: int | None = None
    format: str | None = None
    error: str | None = None
    vector: np.ndarray | None = None
    #: unsigned 64-bit perceptual hashes keyed by HASH_FIELDS, or None to leave the stored ones
    hashes: dict[str, int] | None = None


_RECORD_COLUMNS = (
    ImageRow.id,
    ImageRow.path,
    ImageRow.width,
    ImageRow.height,
    ImageRow.format,
    ImageRow.size,
    ImageRow.mtime,
    ImageRow.status,
    ImageRow.error,
    ImageRow.sha256,
)


@functools.lru_cache(maxsize=256)
def _records_query(dialect: Dialect, count: int) -> tuple[SQLCompiler, tuple[str, ...]]:
    """``get_many``'s SELECT for ``count`` ids, compiled for ``dialect`` with its IN list spelled out, and the
    names of its parameters in the order of the ids they take (compiled with the ids 0..count-1, each
    parameter's value says which id it stands for)."""
    stmt = select(*_RECORD_COLUMNS).where(ImageRow.id.in_(list(range(count))))
    compiled = cast(SQLCompiler, stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}))
    params = compiled.construct_params()
    return compiled, tuple(sorted(params, key=lambda name: params[name]))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while many objects that hold no cycles are built (the rows of a large
    read and what is made of them); it runs again afterwards if it ran before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _driver_cursor(connection: Connection) -> Iterator[Any]:
    """A cursor of the driver's own connection under ``connection`` (in its transaction), closed afterwards. For
    reads of many rows: SQLAlchemy's result rows cost about 3x as much per row."""
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    finally:
        cursor.close()


def _driver_params(compiled: SQLCompiler, values: Mapping[str, Any]) -> list[Any] | dict[str, Any]:
    """``values`` (by parameter name) as the driver of ``compiled`` takes them: in the SQL's order for positional
    parameter styles (sqlite3's ?), by name for the others (psycopg's %(name)s)."""
    if compiled.positional:
        return [values[name] for name in compiled.positiontup or ()]
    return dict(values)


def hash_to_db(value: int) -> int:
    """Unsigned 64-bit -> signed BIGINT (both databases store signed 64-bit integers)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _result_values(result: ImageResult, model: str, now: datetime) -> dict[str, Any]:
    """The columns ``save_results`` writes for ``result``. A vector (with ``model``) is written with its tags
    marked stale; a failure clears vector, model and hashes; otherwise (a hash back-fill) those stay as stored,
    and so do the hashes when ``result`` has none."""
    values: dict[str, Any] = {
        "path": result.path,
        "size": result.size,
        "mtime": result.mtime,
        "sha256": result.sha256,
        "status": result.status.value,
        "width": result.width,
        "height": result.height,
        "format": result.format,
        "error": result.error,
        "updated_at": now,
    }
    failed = result.status is ImageStatus.FAILED
    if result.vector is not None:
        values.update(embedding=vector_to_bytes(result.vector), model=model, tags_key=None)
    elif failed:
        values.update(embedding=None, model=None, tags_key=None)
    if result.hashes is not None:
        values.update({key: hash_to_db(result.hashes[key]) for key in HASH_FIELDS})
    elif failed:
        values.update(dict.fromkeys(HASH_FIELDS))
    return values


def _tags_generation(session: Any) -> str:
    """The store's current tags generation token ('' before any labels were written), within ``session``."""
    row = session.get(Meta, "tags_generation")
    return row.value if row else ""


def hash_from_db(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def bytes_to_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class Store:
    """All reads and writes of image metadata and vectors. Every write is one transaction."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, echo=echo, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreError(f"invalid database URL {url!r}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._init_schema()

    def _init_schema(self) -> None:
        try:
            Base.metadata.create_all(self.engine)
            with self._sessions.begin() as session:
                row = session.get(Meta, "schema_version")
                if row is None:
                    session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(row.value) > SCHEMA_VERSION:
                    raise StoreError(
                        f"the database has schema version {row.value}, newer than this clipsearch "
                        f"({SCHEMA_VERSION}): upgrade clipsearch"
                    )
                elif int(row.value) < SCHEMA_VERSION:
                    self._migrate(session, int(row.value))
                    row.value = str(SCHEMA_VERSION)
        except OperationalError as exc:
            raise StoreError(f"cannot open the metadata store at {self.safe_url}: {exc.orig}") from exc

    def _migrate(self, session: Any, from_version: int) -> None:
        """Add the columns and indexes of later versions to an older database, in the same transaction."""
        existing = {c["name"] for c in inspect(session.connection()).get_columns("images")}
        for version, table, column, sql_type in _MIGRATIONS:
            if version > from_version and column not in existing:
                session.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))
        for index in sorted(Base.metadata.tables[ImageRow.__tablename__].indexes, key=lambda ix: str(ix.name)):
            if _INDEX_VERSIONS.get(str(index.name), 0) > from_version:
                columns = ", ".join(column.name for column in index.columns)
                log.info("upgrading the metadata store: indexing images by (%s), once (it reads every row: seconds a "
                         "million images)", columns)  # fmt: skip
                index.create(session.connection(), checkfirst=True)

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def schema_version(self) -> int:
        with self._sessions() as session:
            row = session.get(Meta, "schema_version")
            return int(row.value) if row else 0

    def close(self) -> None:
        self.engine.dispose()

    # --- reads -----------------------------------------------------------------------------------

    def file_states(self) -> dict[str, FileState]:
        """Every known path (any status) with what incremental indexing compares against."""
        columns: list[Any] = [
            ImageRow.id,
            ImageRow.path,
            ImageRow.size,
            ImageRow.mtime,
            ImageRow.sha256,
            ImageRow.status,
            ImageRow.model,
            ImageRow.phash.is_not(None),
        ]
        stmt = select(*columns)
        # through the driver's cursor and with the cyclic garbage collector paused (a million new tuples would run
        # it dozens of times over the growing heap): 1M paths in 2.8-2.9 s, where SQLAlchemy's rows took 5.8-7.8 s
        with _gc_paused():
            return {
                path: FileState(image_id, path, size, mtime, sha, status, model, bool(hashes))
                for image_id, path, size, mtime, sha, status, model, hashes in self._driver_rows(stmt)
            }

    def embedded_shas(self, model: str) -> set[str]:
        """Contents that already have a vector for ``model`` (in any row, a deleted one too)."""
        stmt = (
            select(ImageRow.sha256)
            .where(ImageRow.model == model, ImageRow.embedding.is_not(None), ImageRow.sha256.is_not(None))
            .distinct()
        )
        return {row[0] for row in self._driver_rows(stmt) if row[0]}

    def reusable_by_sha(self, shas: Iterable[str], model: str) -> dict[str, ImageResult]:
        """For each known content: its vector and image facts, ready to copy onto another path."""
        wanted = list(set(shas))
        found: dict[str, ImageResult] = {}
        with self._sessions() as session:
            for i in range(0, len(wanted), 500):
                stmt = select(
                    ImageRow.sha256,
                    ImageRow.embedding,
                    ImageRow.width,
                    ImageRow.height,
                    ImageRow.format,
                    ImageRow.phash,
                    ImageRow.dhash,
                    ImageRow.phash_mirror,
                    ImageRow.dhash_mirror,
                ).where(
                    ImageRow.sha256.in_(wanted[i : i + 500]),
                    ImageRow.model == model,
                    ImageRow.embedding.is_not(None),
                )
                for sha, blob, width, height, fmt, *hashes in session.execute(stmt):
                    if sha is None or blob is None:
                        continue
                    present = [int(h) for h in hashes if h is not None]
                    known = None
                    if len(present) == len(HASH_FIELDS):
                        known = {k: hash_from_db(h) for k, h in zip(HASH_FIELDS, present, strict=True)}
                    found.setdefault(
                        sha,
                        ImageResult(
                            path="",
                            size=0,
                            mtime=0.0,
                            sha256=sha,
                            status=ImageStatus.INDEXED,
                            width=width,
                            height=height,
                            format=fmt,
                            vector=bytes_to_vector(blob),
                            hashes=known,
                        ),
                    )
        return found

    def ping(self) -> None:
        """Raise SQLAlchemyError when the database cannot be reached (a trivial query)."""
        with self._sessions() as session:
            session.execute(select(literal(1)))

    def count_indexed(self, model: str) -> int:
        """Images indexed with ``model`` (see count_indexed_statement)."""
        with self._sessions() as session:
            return int(session.scalar(self.count_indexed_statement(model)) or 0)

    @staticmethod
    def count_indexed_statement(model: str) -> Select[int]:
        """The count of images indexed with ``model``. A row's model is written with its vector and cleared with it
        (_result_values), so status and model are enough, and ix_images_status_model answers alone."""
        return select(func.count()).where(ImageRow.status == ImageStatus.INDEXED, ImageRow.model == model)

    def vector_dim(self, model: str) -> int | None:
        """The length of the vectors stored for ``model`` (from one row), or None when none is stored."""
        stmt = (
            select(func.length(ImageRow.embedding))
            .where(ImageRow.model == model, ImageRow.embedding.is_not(None))
            .limit(1)
        )
        with self._sessions() as session:
            size = session.scalar(stmt)
        return None if size is None else int(size) // np.dtype("<f4").itemsize

    def iter_vectors(
        self, model: str, chunk: int = 10_000, *, stride: int = 1, after: int = 0, upto: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every indexed image, in chunks: the index is always rebuildable from here.
        ``stride`` > 1 keeps only ids divisible by it, chosen in the database (a cheap, evenly spread sample).
        ``after``/``upto``: only ids in (after, upto], one worker's range (see ``vector_id_ranges``)."""
        last_id = after
        sampled = [ImageRow.id % stride == 0] if stride > 1 else []
        if upto is not None:
            sampled.append(ImageRow.id <= upto)
        with self._sessions() as session:
            while True:
                stmt = (
                    select(ImageRow.id, ImageRow.embedding)
                    .where(
                        ImageRow.status == ImageStatus.INDEXED,
                        ImageRow.model == model,
                        ImageRow.embedding.is_not(None),
                        ImageRow.id > last_id,
                        *sampled,
                    )
                    .order_by(ImageRow.id)
                    .limit(chunk)
                )
                rows = session.execute(stmt).all()
                if not rows:
                    return
                ids = np.array([r.id for r in rows], dtype=np.int64)
                vectors = np.stack([bytes_to_vector(r.embedding) for r in rows])
                last_id = int(ids[-1])
                yield ids, vectors

    def vector_id_ranges(self, model: str, size: int) -> list[tuple[int, int]]:
        """Id ranges (after, upto] holding ``size`` indexed vectors each (the last one the rest), found by
        skipping ``size`` rows at a time along the id order: no id list is held."""
        ranges: list[tuple[int, int]] = []
        last_id = 0
        indexed = (ImageRow.status == ImageStatus.INDEXED, ImageRow.model == model, ImageRow.embedding.is_not(None))
        with self._sessions() as session:
            while True:
                base = select(ImageRow.id).where(*indexed, ImageRow.id > last_id).order_by(ImageRow.id)
                bound = session.scalar(base.offset(size - 1).limit(1))
                if bound is None:
                    end = session.scalar(select(func.max(ImageRow.id)).where(*indexed, ImageRow.id > last_id))
                    if end is not None:
                        ranges.append((last_id, int(end)))
                    return ranges
                ranges.append((last_id, int(bound)))
                last_id = int(bound)

    def iter_vectors_for(
        self, ids: Sequence[int], model: str, chunk: int = 500
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of those of ``ids`` that are indexed with ``model``."""
        with self._sessions() as session:
            for i in range(0, len(ids), chunk):
                stmt = select(ImageRow.id, ImageRow.embedding).where(
                    ImageRow.id.in_([int(x) for x in ids[i : i + chunk]]),
                    ImageRow.status == ImageStatus.INDEXED,
                    ImageRow.model == model,
                    ImageRow.embedding.is_not(None),
                )
                rows = session.execute(stmt).all()
                if rows:
                    yield (
                        np.array([r.id for r in rows], dtype=np.int64),
                        np.stack([bytes_to_vector(r.embedding) for r in rows]),
                    )

    def iter_hashes(self, chunk: int = 50_000) -> Iterator[tuple[int, dict[str, int]]]:
        """(id, hashes) of every indexed image that has them, for the hash neighbour index."""
        for rows in self._keyset_chunks(self.hashes_statement, chunk):
            for image_id, *values in rows:
                yield image_id, {k: hash_from_db(v) for k, v in zip(HASH_FIELDS, values, strict=True)}

    def hash_arrays(self, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
        """``iter_hashes`` as arrays: ids (n,) int64 and hashes (n, 4) uint64 in ``HASH_FIELDS``' order, without a
        Python object per image (``HashIndex.from_arrays``)."""
        ids, hashes = [np.empty(0, dtype=np.int64)], [np.empty((0, len(HASH_FIELDS)), dtype=np.uint64)]
        for rows in self._keyset_chunks(self.hashes_statement, chunk):
            block = np.array(rows, dtype=np.int64).reshape(len(rows), 1 + len(HASH_FIELDS))
            ids.append(block[:, 0].copy())
            hashes.append(block[:, 1:].view(np.uint64))  # the stored signed values' bits: hash_from_db's unsigned
        return np.concatenate(ids), np.concatenate(hashes)

    @staticmethod
    def hashes_statement(after: int, chunk: int) -> Select[Any]:
        """The next ``chunk`` indexed images after id ``after`` that have perceptual hashes: id and hashes, in id
        order (ix_images_status_hashes answers alone)."""
        return Store._catalog_chunk([ImageRow.id, *(getattr(ImageRow, k) for k in HASH_FIELDS)], after, chunk)

    def iter_catalog_keys(self, chunk: int = 50_000) -> Iterator[tuple[int, str | None, str, int, float]]:
        """(id, sha256, path, size, mtime) of every indexed image that has perceptual hashes (the catalog that the
        duplicate look-up searches), in id order: what its local-feature cache knows each image by. 2.1-2.8 s for
        1M images (SQLite) where their whole records, read 500 ids at a time, took 11 s and 1.6 GB."""
        for rows in self._keyset_chunks(self.catalog_keys_statement, chunk):
            yield from rows

    @staticmethod
    def catalog_keys_statement(after: int, chunk: int) -> Select[Any]:
        return Store._catalog_chunk(
            [ImageRow.id, ImageRow.sha256, ImageRow.path, ImageRow.size, ImageRow.mtime], after, chunk
        )

    @staticmethod
    def _catalog_chunk(columns: list[Any], after: int, chunk: int) -> Select[Any]:
        """``columns`` of the next ``chunk`` indexed images after id ``after`` that have perceptual hashes (the
        duplicate look-up's catalog), in id order."""
        return (
            select(*columns)
            .where(ImageRow.status == ImageStatus.INDEXED.value, ImageRow.phash.is_not(None), ImageRow.id > after)
            .order_by(ImageRow.id)
            .limit(chunk)
        )

    def _keyset_chunks(self, statement: Callable[[int, int], Select[Any]], chunk: int) -> Iterator[list[Any]]:
        """The rows of ``statement(after, chunk)`` (id first, in id order) for after = 0 and then each chunk's last
        id, until one comes back empty: every row of a large table without holding its read open between chunks.
        Through the driver's cursor: ``iter_hashes`` over 1M images in 1.6 s where SQLAlchemy's rows took 2.9 s."""
        last_id = 0
        while True:
            rows = self._driver_rows(statement(last_id, chunk))
            if not rows:
                return
            yield rows
            last_id = rows[-1][0]

    def _driver_rows(self, statement: Select[Any]) -> list[tuple[Any, ...]]:
        """Every row of a Core SELECT whose columns need no type conversion (ints, floats, strings), read through
        the driver's own cursor: SQLAlchemy's result rows cost about 3x as much per row."""
        with self.engine.connect() as conn, _driver_cursor(conn) as cursor, _gc_paused():
            compiled = cast(SQLCompiler, statement.compile(dialect=conn.dialect))
            cursor.execute(str(compiled), _driver_params(compiled, compiled.construct_params()))
            return [tuple(row) for row in cursor.fetchall()]

    def vector(self, image_id: int) -> np.ndarray:
        with self._sessions() as session:
            blob = session.scalar(select(ImageRow.embedding).where(ImageRow.id == image_id))
        if blob is None:
            raise NotFound(f"image {image_id} has no stored vector (unknown id, or the file failed to index)")
        return bytes_to_vector(blob)

    def get(self, image_id: int) -> ImageRecord:
        records = self.get_many([image_id])
        if image_id not in records:
            raise NotFound(f"no image with id {image_id}")
        return records[image_id]

    def get_many(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """The records of ``ids`` (unknown ids left out). Every search page reads its rows here, through the
        driver's cursor with the SQL compiled once per number of ids: 20 random rows of 1M (SQLite) took 0.33 ms
        against 1.34 ms through a Session on a first read, 0.16 against 0.6-0.7 ms read again; inside the service's
        queries 0.33 against 1.24 ms. Many ids are read ``GET_MANY_CHUNK`` at a time, on one connection."""
        if not ids:
            return {}
        wanted = [int(i) for i in ids]
        found: dict[int, ImageRecord] = {}
        with self.engine.connect() as conn, _driver_cursor(conn) as cursor:
            for start in range(0, len(wanted), GET_MANY_CHUNK):
                part = wanted[start : start + GET_MANY_CHUNK]
                compiled, names = _records_query(conn.dialect, len(part))
                cursor.execute(str(compiled), _driver_params(compiled, dict(zip(names, part, strict=True))))
                found.update((row[0], ImageRecord(*row)) for row in cursor)
        return found

    def counts(self) -> dict[str, int]:
        stmt = select(ImageRow.status, func.count()).group_by(ImageRow.status)
        with self._sessions() as session:
            counts = {status.value: 0 for status in ImageStatus}
            counts.update({status: n for status, n in session.execute(stmt)})
            return counts

    def failures(self, limit: int = 20) -> list[tuple[str, str]]:
        stmt = (
            select(ImageRow.path, ImageRow.error)
            .where(ImageRow.status == ImageStatus.FAILED)
            .order_by(ImageRow.path)
            .limit(limit)
        )
        with self._sessions() as session:
            return [(p, e or "") for p, e in session.execute(stmt)]

    # --- writes ----------------------------------------------------------------------------------

    def save_results(self, results: Sequence[ImageResult], model: str) -> dict[str, int]:
        """Insert or update one row per path, in one transaction. Returns path -> row id.

        Written as two bulk statements (new paths inserted with their ids returned, known ones updated by id):
        a batch of 32 new photos took 12-20 ms through ORM objects, a tenth of a small model's batch."""
        if not results:
            return {}
        now = utcnow()
        with self._sessions.begin() as session:
            paths = [r.path for r in results]
            stored = session.execute(select(ImageRow.path, ImageRow.id).where(ImageRow.path.in_(paths)))
            ids: dict[str, int] = {path: row_id for path, row_id in stored}
            new: dict[str, dict[str, Any]] = {}
            known: dict[str, dict[str, Any]] = {}
            for result in results:  # a path given twice: its last result wins, as with one ORM row per path
                values = _result_values(result, model, now)
                if result.path in ids:
                    known[result.path] = {"id": ids[result.path], **values}
                else:
                    new[result.path] = {"created_at": now, **values}
            if new:
                inserted = session.execute(insert(ImageRow).returning(ImageRow.path, ImageRow.id), list(new.values()))
                ids.update({path: row_id for path, row_id in inserted})
            if known:
                session.execute(update(ImageRow), list(known.values()))
            return {path: ids[path] for path in paths}

    def mark_deleted(self, ids: Iterable[int]) -> int:
        wanted = [int(i) for i in ids]
        done = 0
        with self._sessions.begin() as session:
            for i in range(0, len(wanted), 500):
                stmt = (
                    update(ImageRow)
                    .where(ImageRow.id.in_(wanted[i : i + 500]))
                    .values(status=ImageStatus.DELETED.value, updated_at=utcnow())
                )
                done += session.execute(stmt).rowcount or 0  # type: ignore[attr-defined]
        return done

    # --- tags and flags --------------------------------------------------------------------------

    def ids_to_tag(self, model: str, key: str | None) -> list[int]:
        """Indexed images (vectors of ``model``) whose labels were not computed with ``key``: new, re-embedded,
        or tagged under another vocabulary, threshold or model. ``key=None``: every indexed image."""
        return sorted(int(row[0]) for row in self._driver_rows(self.ids_to_tag_statement(model, key)))

    @staticmethod
    def ids_to_tag_statement(model: str, key: str | None) -> Select[Any]:
        """A row's model is written and cleared with its vector, so an indexed row of ``model`` has one: the
        statement reads ix_images_status_model_tags alone (unordered: ordered by id, SQLite would rather read
        ix_images_status_model in id order and every row for its tags_key)."""
        stmt = select(ImageRow.id).where(ImageRow.status == ImageStatus.INDEXED.value, ImageRow.model == model)
        if key is not None:
            stmt = stmt.where(or_(ImageRow.tags_key.is_(None), ImageRow.tags_key != key))
        return stmt

    def save_tags(self, labels: Mapping[int, Sequence[StoredTag]], key: str) -> None:
        """Replace the tags and flags of these images and record ``key`` on them, in one transaction."""
        ids = [int(i) for i in labels]
        if not ids:
            return
        rows = [
            {"image_id": int(image_id), "kind": tag.kind, "label": tag.label, "score": float(tag.score)}
            for image_id, tags in labels.items()
            for tag in tags
        ]
        with self._sessions.begin() as session:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                session.execute(delete(ImageTagRow).where(ImageTagRow.image_id.in_(chunk)))
                session.execute(update(ImageRow).where(ImageRow.id.in_(chunk)).values(tags_key=key))
            if rows:
                session.execute(insert(ImageTagRow), rows)
            self._touch_tags(session)

    def _touch_tags(self, session: Any) -> None:
        """A new random generation token: readers that cache labels compare it to know they changed."""
        row = session.get(Meta, "tags_generation")
        token = uuid.uuid4().hex
        if row is None:
            session.add(Meta(key="tags_generation", value=token))
        else:
            row.value = token

    def tags_generation(self) -> str:
        """Changes whenever any image's tags or flags are written."""
        with self._sessions() as session:
            return _tags_generation(session)

    def tags_of(self, image_id: int) -> list[StoredTag]:
        """The tags and flags of one image: tags first, each kind best first."""
        stmt = (
            select(ImageTagRow.kind, ImageTagRow.label, ImageTagRow.score)
            .where(ImageTagRow.image_id == int(image_id))
            .order_by(ImageTagRow.kind.desc(), ImageTagRow.score.desc(), ImageTagRow.label)
        )
        with self._sessions() as session:
            return [StoredTag(kind, label, float(score)) for kind, label, score in session.execute(stmt)]

    def labels_of_many(self, ids: Sequence[int]) -> dict[int, ImageLabels]:
        """Tag names and flagged-or-not of each of ``ids`` (an image with neither is left out)."""
        tags: dict[int, set[str]] = {}
        flagged: set[int] = set()
        wanted = [int(i) for i in ids]
        with self._sessions() as session:
            for i in range(0, len(wanted), 500):
                stmt = select(ImageTagRow.image_id, ImageTagRow.kind, ImageTagRow.label).where(
                    ImageTagRow.image_id.in_(wanted[i : i + 500])
                )
                for image_id, kind, label in session.execute(stmt):
                    if kind == TagKind.FLAG:
                        flagged.add(image_id)
                    else:
                        tags.setdefault(image_id, set()).add(label)
        return {i: ImageLabels(frozenset(tags.get(i, ())), i in flagged) for i in wanted if i in tags or i in flagged}

    def label_columns(self) -> tuple[str, list[tuple[str, np.ndarray]], np.ndarray]:
        """Every label at once, read in one transaction: the tags generation, each tag name with the ids of the
        images carrying it, and the ids of the images with any flag (app.labels builds its snapshot from it)."""
        with self._sessions.begin() as session:
            generation = _tags_generation(session)
            names = session.execute(
                select(ImageTagRow.label).where(ImageTagRow.kind == TagKind.TAG.value).distinct()
            ).scalars()
            # Millions of rows: through the driver's cursor (1M images with 5 tags each: 2.6 s, against 7.5-8.2 s)
            connection = session.connection()
            query = select(ImageTagRow.image_id).where(
                ImageTagRow.kind == TagKind.TAG.value, ImageTagRow.label == bindparam("label")
            )
            compiled = cast(SQLCompiler, query.compile(dialect=connection.dialect))  # this driver's SQL and style
            columns = []
            with _driver_cursor(connection) as cursor:
                for name in sorted(names):
                    cursor.execute(str(compiled), _driver_params(compiled, compiled.construct_params({"label": name})))
                    columns.append((name, np.fromiter((row[0] for row in cursor), dtype=np.int64)))
            flagged = (
                session.execute(select(ImageTagRow.image_id).where(ImageTagRow.kind == TagKind.FLAG.value).distinct())
                .scalars()
                .all()
            )
        return generation, columns, np.unique(np.fromiter(flagged, dtype=np.int64, count=len(flagged)))

    def label_counts(self, kind: TagKind, model: str | None = None) -> dict[str, int]:
        """Label -> number of indexed images carrying it (with vectors of ``model``, when given), most first."""
        count = func.count(ImageTagRow.image_id)
        stmt = (
            select(ImageTagRow.label, count)
            .join(ImageRow, ImageRow.id == ImageTagRow.image_id)
            .where(ImageTagRow.kind == kind.value, ImageRow.status == ImageStatus.INDEXED)
            .group_by(ImageTagRow.label)
            .order_by(count.desc(), ImageTagRow.label)
        )
        if model is not None:
            stmt = stmt.where(ImageRow.model == model)
        with self._sessions() as session:
            return {label: int(n) for label, n in session.execute(stmt)}

    def ids_with_tags(self, labels: Iterable[str]) -> set[int]:
        """Indexed images carrying every one of the tags ``labels``."""
        wanted = sorted(set(labels))
        if not wanted:
            return set()
        stmt = (
            select(ImageTagRow.image_id)
            .join(ImageRow, ImageRow.id == ImageTagRow.image_id)
            .where(
                ImageTagRow.kind == TagKind.TAG.value,
                ImageTagRow.label.in_(wanted),
                ImageRow.status == ImageStatus.INDEXED,
            )
            .group_by(ImageTagRow.image_id)
            .having(func.count(ImageTagRow.label) == len(wanted))
        )
        with self._sessions() as session:
            return {int(i) for i in session.scalars(stmt)}

    def flagged_ids(self) -> set[int]:
        """Indexed images with at least one safe-search flag."""
        stmt = (
            select(ImageTagRow.image_id)
            .join(ImageRow, ImageRow.id == ImageTagRow.image_id)
            .where(ImageTagRow.kind == TagKind.FLAG.value, ImageRow.status == ImageStatus.INDEXED)
            .distinct()
        )
        with self._sessions() as session:
            return {int(i) for i in session.scalars(stmt)}
