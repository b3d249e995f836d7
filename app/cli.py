"""The `clipsearch` command: thin wrappers that parse, call the library and print."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from app.config import Settings
from app.errors import ClipSearchError, NotReady
from app.index import read_manifest

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURES = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def settings_options(func: F) -> F:
    """The settings every command accepts; a flag overrides the CLIPSEARCH_* variable of the same name."""
    options = [
        click.option("--data-dir", type=click.Path(path_type=Path), help="Folder for the database and index."),
        click.option("--database-url", help="SQLAlchemy URL of the metadata store (default: SQLite in data dir)."),
        click.option("--model", help="open_clip model name or local-dir:/path."),
        click.option("--pretrained", help="Pretrained tag or checkpoint file ('' for none)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the model runs."),
        click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per model call."),
        click.option("--workers", "decode_workers", type=click.IntRange(1, 256), help="Decode threads."),
        click.option("--max-image-pixels", type=click.IntRange(1), help="Refuse images with more pixels."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(overrides: dict[str, Any]) -> Settings:
    keys = ("data_dir", "database_url", "model", "pretrained", "device", "batch_size", "decode_workers",
            "max_image_pixels", "encode_lanes")  # fmt: skip
    picked = {k: overrides.pop(k) for k in keys if k in overrides}
    try:
        return Settings().with_overrides(**picked)
    except ValueError as exc:
        raise ClipSearchError(f"invalid setting: {exc}") from exc


def handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ClipSearchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="clipsearch")
def main(verbose: int) -> None:
    """Semantic search over your own photos: index a folder, then find pictures by describing them."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("paths", nargs=-1)
@settings_options
@click.option("--rebuild", is_flag=True, help="Rebuild the index from the store (no re-embedding).")
@click.option(
    "--compact",
    is_flag=True,
    help="Compact the on-disk index (ivf-ondisk) afterwards: drop every deleted vector, merge small shards. "
    "Without PATHS: only that.",
)
@click.option("--retry-failed", is_flag=True, help="Try again files that failed before, even if unchanged.")
@click.option(
    "--lanes",
    "encode_lanes",
    type=click.IntRange(0, 64),
    help="CPU: batches prepared and encoded at once, each on its share of the cores (0: one per core, at most 4; "
    "1: one batch at a time on every core, fed by the decode threads).",
)
@click.option("--strict", is_flag=True, help="Exit with status 1 when any file failed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: a Ray Data job (PATHS may then be fsspec URLs such as s3://bucket/prefix).",
)
@click.option("--ray-address", help="Address of a running Ray cluster (default: start a local Ray).")
@click.option("--ray-workers", type=click.IntRange(1), help="Embedding actors (default: one per GPU, else 1).")
@handle_errors
def index(
    paths: tuple[str, ...],
    rebuild: bool,
    compact: bool,
    retry_failed: bool,
    strict: bool,
    quiet: bool,
    engine: str,
    ray_address: str | None,
    ray_workers: int | None,
    **opts: Any,
) -> None:
    """Index (or update the index of) the images under PATHS."""
    from app.lazy_encoder import LazyEncoder
    from app.store import Store
    from indexer import Indexer, IndexSummary

    if not paths and not compact:
        raise click.UsageError("give the folders (or URLs) to index as PATHS")
    if engine == "local" and any("://" in p for p in paths):
        raise click.UsageError("URLs need --engine ray (the local engine indexes folders on this machine)")
    if engine == "local" and (ray_address or ray_workers):
        raise click.UsageError("--ray-address and --ray-workers go with --engine ray")
    settings = _settings(opts)
    store = Store(settings.effective_database_url)
    progress = not quiet and sys.stderr.isatty()
    if not paths:
        click.echo(Indexer(settings, store, LazyEncoder(settings), progress=progress).compact_index())
        return
    summary: IndexSummary
    try:
        if engine == "ray":
            from app.encoder import Encoder
            from indexer.ray_engine import RayIndexer

            ray_indexer = RayIndexer(
                settings, store, Encoder.from_settings(settings), address=ray_address, workers=ray_workers,
                progress=progress,
            )  # fmt: skip
            summary = ray_indexer.run(list(paths), rebuild=rebuild, retry_failed=retry_failed, compact=compact)
        else:
            # the model is built only if some file is new or changed, or some image needs labels
            indexer = Indexer(settings, store, LazyEncoder(settings, indexing=True), progress=progress)
            summary = indexer.run([Path(p) for p in paths], rebuild=rebuild, retry_failed=retry_failed, compact=compact)
    except KeyboardInterrupt:
        click.echo("interrupted: finished batches are saved; run the same command again to finish.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    for line in summary.lines():
        click.echo(line)
    if settings.dupe_feature_cache:  # what the near-duplicate look-up needs of the new images, stored once
        from app.duplicates import update_feature_cache

        click.echo(update_feature_cache(settings, store).line())
    if strict and summary.failed:
        sys.exit(EXIT_FAILURES)


def _print_hits(hits: list[Any], as_json: bool, header: str) -> None:
    if as_json:
        click.echo(json.dumps({"query": header, "hits": [asdict(h) for h in hits]}, indent=2))
        return
    if not hits:
        click.echo("no results (is the index empty?)")
        return
    for rank, hit in enumerate(hits, 1):
        click.echo(f"{rank:>3}  {hit.score:.4f}  #{hit.id:<7} {hit.path}")


@main.command()
@click.argument("query", required=False)
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Search by image.")
@click.option("-k", "--top-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@settings_options
@handle_errors
def search(query: str | None, image: Path | None, k: int, as_json: bool, **opts: Any) -> None:
    """Find images matching a text QUERY (or an --image)."""
    from app.search import open_service

    if (query is None) == (image is None):
        raise click.UsageError("give either a text QUERY or --image FILE (one of them)")
    service = open_service(_settings(opts), lazy_towers=True)
    if image is not None:
        _print_hits(service.search_image_file(image, k), as_json, str(image))
    else:
        assert query is not None
        _print_hits(service.search_text(query, k), as_json, query)


@main.command()
@click.argument("image_id", type=int)
@click.option("-k", "--top-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
@settings_options
@handle_errors
def similar(image_id: int, k: int, as_json: bool, **opts: Any) -> None:
    """Images most like the indexed image IMAGE_ID (itself excluded)."""
    from app.search import open_service

    service = open_service(_settings(opts), lazy_towers=True)
    _print_hits(service.similar(image_id, k), as_json, f"similar to #{image_id}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--failures", "show_failures", is_flag=True, help="List failed files with their reasons.")
@settings_options
@handle_errors
def stats(as_json: bool, show_failures: bool, **opts: Any) -> None:
    """Counts by status, the model and the index size."""
    from app.store import Store

    settings = _settings(opts)
    store = Store(settings.effective_database_url)
    info: dict[str, Any] = {
        "database": store.safe_url,
        "schema_version": store.schema_version(),
        "images": store.counts(),
        "index_dir": str(settings.index_dir),
    }
    try:
        manifest = read_manifest(settings.index_dir)
        files = [manifest.index_file]
        if manifest.shards:
            from app.index_ondisk import shard_files

            files += [name for shard in manifest.shards for name in shard_files(shard)]
        info["index"] = asdict(manifest) | {"bytes": sum((settings.index_dir / f).stat().st_size for f in files)}
    except (NotReady, ClipSearchError, OSError) as exc:
        info["index"] = None
        info["index_problem"] = str(exc)
    if show_failures:
        info["failures"] = [{"path": p, "reason": r} for p, r in store.failures(limit=1000)]
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    counts = info["images"]
    click.echo(f"database: {info['database']} (schema v{info['schema_version']})")
    click.echo("images:   " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if info["index"]:
        m = info["index"]
        click.echo(
            f"index:    {m['count']} vectors, {m['dim']}-d, {m['index_type']}"
            + (f" ({len(m['shards'])} shards)" if m["shards"] else "")
            + f", {m['bytes'] / 1e6:.1f} MB, built {m['built_at']}"
        )
        click.echo(f"model:    {m['model']}" + (f" ({m['pretrained']})" if m["pretrained"] else ""))
    else:
        click.echo(f"index:    none ({info['index_problem']})")
    for item in info.get("failures", []):
        click.echo(f"failed:   {item['path']}: {item['reason']}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@settings_options
@handle_errors
def serve(host: str, port: int, **opts: Any) -> None:
    """Run the search API and web UI under uvicorn."""
    from app.preload import IndexPreload

    settings = _settings(opts)
    # Started before torch and the model are imported: the index is read meanwhile (see app.preload).
    preload = IndexPreload(settings.index_dir, nprobe=settings.nprobe)

    import uvicorn

    from app.api import create_app

    uvicorn.run(create_app(settings, preload=preload), host=host, port=port, log_level="info")


@main.command()
@click.option("--image", "image_id", type=click.IntRange(1), help="Show the tags and flags of this image id.")
@click.option(
    "--retag",
    is_flag=True,
    help="Recompute every image's tags and flags from its stored vector first (after changing the vocabulary "
    "or thresholds; 'clipsearch index' does it too, for the images whose settings changed). No re-embedding.",
)
@click.option("--all", "include_unused", is_flag=True, help="Also list the vocabulary labels no image carries.")
@click.option(
    "-n", "--limit", default=50, show_default=True, type=click.IntRange(0), help="Labels listed per kind (0: all)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@settings_options
@handle_errors
def tags(
    image_id: int | None, retag: bool, include_unused: bool, limit: int, as_json: bool, quiet: bool, **opts: Any
) -> None:
    """List the zero-shot tags and safe-search flags of the catalog with how many images carry each."""
    from app.encoder import ModelSpec
    from app.store import Store, TagKind
    from app.tagging import TaggingPlan, label_names

    settings = _settings(opts)
    plan = TaggingPlan.from_settings(settings)
    store = Store(settings.effective_database_url)
    try:
        if retag:
            from app.encoder import Encoder
            from indexer import Indexer

            progress = not quiet and sys.stderr.isatty()
            done = Indexer(settings, store, Encoder.from_settings(settings), progress=progress).tag(everything=True)
            click.echo(f"tagged {done} images", err=as_json)
        if image_id is not None:
            record = store.get(image_id)  # NotFound for an unknown id
            found = store.tags_of(image_id)
            out = {
                kind.value: [{"label": t.label, "score": t.score} for t in found if t.kind == kind] for kind in TagKind
            }
            if as_json:
                click.echo(json.dumps({"id": image_id, "tags": out["tag"], "flags": out["flag"]}, indent=2))
                return
            status = "" if record.status == "indexed" else f" ({record.status})"
            click.echo(f"image #{image_id}: {record.path}{status}")
            for kind, title in ((TagKind.TAG, "tags"), (TagKind.FLAG, "flags")):
                listed = ", ".join(f"{t['label']} {t['score']:.2f}" for t in out[kind.value]) or "none"
                click.echo(f"  {title}: {listed}")
            return
        model = ModelSpec.from_settings(settings).store_key
        counts = {kind: store.label_counts(kind, model=model) for kind in TagKind}
        if include_unused:
            for kind in TagKind:
                for name in label_names(plan, kind):
                    counts[kind].setdefault(name, 0)
        if limit:
            counts = {kind: dict(list(found.items())[:limit]) for kind, found in counts.items()}
        vocabularies = {
            TagKind.TAG: plan.tags.vocabulary.name if plan.tags else None,
            TagKind.FLAG: plan.flags.vocabulary.name if plan.flags else None,
        }
        if as_json:
            body = {
                "vocabulary": vocabularies[TagKind.TAG],
                "safe_search_vocabulary": vocabularies[TagKind.FLAG],
                "tags": [{"label": k, "count": v} for k, v in counts[TagKind.TAG].items()],
                "flags": [{"label": k, "count": v} for k, v in counts[TagKind.FLAG].items()],
            }
            click.echo(json.dumps(body, indent=2))
            return
        for kind, title in ((TagKind.TAG, "tags"), (TagKind.FLAG, "flags")):
            vocabulary = vocabularies[kind]
            click.echo(f"{title} (vocabulary {vocabulary!r}):" if vocabulary else f"{title} (disabled):")
            for label, count in counts[kind].items():
                click.echo(f"  {count:>7}  {label}")
            if not counts[kind] and vocabulary:
                click.echo("  none yet: run 'clipsearch index' (or 'clipsearch tags --retag')")
    finally:
        store.close()


class _StageProgress:
    """One tqdm bar per stage of a long library call (its ``progress(stage, done, total)`` callback)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@main.command()
@click.argument("under", required=False, type=click.Path(path_type=Path))
@click.option(
    "--min-verdict",
    type=click.Choice(["exact", "near_duplicate", "similar"]),
    default="near_duplicate",
    show_default=True,
    help="Join images judged this or stronger: exact (same pixels), near_duplicate (edited copies too), similar "
    "(also the same scene, e.g. burst shots).",
)
@click.option(
    "-k",
    "--neighbours",
    default=5,
    show_default=True,
    type=click.IntRange(0, 100),
    help="CLIP and ORB-vote neighbours verified per image (perceptual-hash neighbours always are).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@settings_options
@handle_errors
def dupes(under: Path | None, min_verdict: str, neighbours: int, as_json: bool, quiet: bool, **opts: Any) -> None:
    """Groups of duplicate images in the catalog (only those under the folder UNDER, when given).

    Candidate pairs (hash, CLIP and ORB-vote neighbours) are verified with local features; groups are the
    images joined by verified copies. Burst shots and re-shoots of a scene are 'similar', not duplicates.
    """
    from app.duplicates import DupeService
    from app.search import open_service

    settings = _settings(opts)
    service = open_service(settings, require_index=False, lazy_towers=True)
    finder = DupeService(settings, service)
    progress = _StageProgress(not quiet and not as_json and sys.stderr.isatty())
    try:
        report = finder.find_groups(
            min_verdict=min_verdict, under=str(under) if under else None, neighbours=neighbours, progress=progress
        )
    finally:
        progress.close()
        finder.close()
        service.store.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if report.images == 0:
        click.echo("no indexed images" + (f" under {under}" if under else "") + ": run 'clipsearch index PATH' first")
        return
    if report.groups:
        click.echo(f"{'group':>5}  {'id':<8} {'verdict':<15} path")
        for number, group in enumerate(report.groups, 1):
            for member in group.members:
                verdict = member.verdict.value if member.verdict is not None else "(first)"
                click.echo(f"{number:>5}  #{member.id:<7} {verdict:<15} {member.path}")
    grouped = sum(len(g.members) for g in report.groups)
    click.echo(
        f"{len(report.groups)} groups of {grouped} images ({min_verdict} or stronger) among {report.images} images; "
        f"{report.pairs} candidate pairs verified in {report.seconds:.1f}s"
    )
    for path, reason in report.unreadable[:5]:
        click.echo(f"  skipped unreadable: {path}: {reason}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--measure",
    "measure",
    multiple=True,
    metavar="MODEL",
    help="Also time this architecture here with random weights (repeatable; 'catalog': every listed one).",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024), help="Images per call.")
@handle_errors
def models(as_json: bool, measure: tuple[str, ...], batch_size: int) -> None:
    """Recommended models: published quality, download size, speed here, and how to switch."""
    from app.models_catalog import CATALOG, HOW_TO_SWITCH, MEASURED_ON, SOURCE, measure_speed, table_lines

    names = [m.name for m in CATALOG] if "catalog" in measure else list(dict.fromkeys(measure))
    measured: list[dict[str, Any]] = []
    for name in names:
        try:
            measured.append(asdict(measure_speed(name, batch_size=batch_size)))
        except Exception as exc:  # one architecture that cannot be built offline must not hide the others
            measured.append({"model": name, "error": f"{exc.__class__.__name__}: {exc}"})
    if as_json:
        payload = {
            "models": [m.as_dict() for m in CATALOG],
            "source": SOURCE,
            "measured_on": MEASURED_ON,
            "how_to_switch": HOW_TO_SWITCH,
            "measured_now": measured,
        }
        click.echo(json.dumps(payload, indent=2))
        return
    for line in table_lines():
        click.echo(line)
    if measured:
        click.echo("\nmeasured now (random weights, CPU):")
        for row in measured:
            if "error" in row:
                click.echo(f"  {row['model']}: could not measure: {row['error']}")
            else:
                click.echo(
                    f"  {row['model']}: {row['params_millions']:.1f}M params, {row['images_per_second']:.1f} img/s "
                    f"(batch {row['batch_size']}), text {row['text_ms']:.1f} ms/query"
                )


from app.cli_eval import eval_group  # noqa: E402

main.add_command(eval_group)

if __name__ == "__main__":
    main()
