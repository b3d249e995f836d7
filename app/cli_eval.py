"""`clipsearch eval`: retrieval recall and zero-shot accuracy of the configured model on your own labelled data."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from app.vocab import SINGLE_TEMPLATE


def _eval() -> None:
    """Measure the model on a captioned or labelled image set (retrieval recall, zero-shot accuracy)."""


# Typed by hand: mypy cannot infer it through the import cycle with app.cli (see below).
eval_group: click.Group = click.group("eval")(_eval)


# Imported once the group exists: app.cli imports this module at its end to register the group, and under
# `python -m app.cli` that import comes back here while this module is still half-loaded.
from app.cli import _settings, handle_errors, settings_options  # noqa: E402


def _common(func: Any) -> Any:
    options = [
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        click.option("--fast-decode", is_flag=True, help="Decode JPEGs at reduced scale, as the indexer does."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@contextmanager
def _progress(total: int, quiet: bool, what: str) -> Iterator[Callable[[int], None] | None]:
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="img", desc=what, file=sys.stderr, leave=False) as bar:
        yield bar.update


@eval_group.command("retrieval")
@click.option(
    "--captions",
    "captions_file",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV with columns image,caption, or COCO-style captions JSON.",
)
@click.option(
    "--images", "images_dir", required=True, type=click.Path(path_type=Path), help="Folder the image names are in."
)
@_common
@settings_options
@handle_errors
def retrieval(
    captions_file: Path, images_dir: Path, as_json: bool, fast_decode: bool, quiet: bool, **opts: Any
) -> None:
    """Text-to-image and image-to-text Recall@1/5/10 on a captioned image set."""
    from app.encoder import Encoder
    from app.evaluation import ImageOptions, evaluate_retrieval, load_captions

    settings = _settings(opts)
    total = len(load_captions(captions_file, images_dir).images)
    encoder = Encoder.from_settings(settings)
    with _progress(total, quiet, "encoding images") as progress:
        options = ImageOptions.from_settings(settings, draft=fast_decode, progress=progress)
        report = evaluate_retrieval(encoder, captions_file, images_dir, images=options)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    click.echo(f"retrieval: {report.captions} captions of {report.images} images ({report.captions_file})")
    click.echo(f"model:     {report.model}")
    click.echo("")
    rows = [
        ("text -> image", report.text_to_image),
        ("  chance", report.chance_text_to_image),
        ("image -> text", report.image_to_text),
        ("  chance", report.chance_image_to_text),
    ]
    click.echo(f"{'':<16}" + "".join(f"{f'R@{k}':>8}" for k in report.text_to_image))
    for name, values in rows:
        click.echo(f"{name:<16}" + "".join(f"{v:>8.2f}" for v in values.values()))
    click.echo(f"\nmedian rank of the right image (text -> image): {report.median_rank_text_to_image:g}")
    _print_skipped(report.skipped)


@eval_group.command("zeroshot")
@click.option(
    "--images",
    "images_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder with one sub-folder of images per class (the class = the folder name).",
)
@click.option(
    "--names",
    "names_file",
    type=click.Path(path_type=Path),
    help='JSON map of folder name -> class name used in prompts ({"Faces": "face"}).',
)
@click.option(
    "--templates",
    type=click.Choice(["single", "ensemble", "both"]),
    default="both",
    show_default=True,
    help=f"'{SINGLE_TEMPLATE}' alone, the mean of the 80 CLIP ImageNet templates, or both side by side.",
)
@click.option("--prompt", "single_prompt", default=SINGLE_TEMPLATE, show_default=True, help="The single prompt.")
@click.option("--confusions", default=10, show_default=True, type=click.IntRange(0, 1000), help="Pairs to list.")
@click.option("--per-class", is_flag=True, help="List every class's top-1 accuracy.")
@_common
@settings_options
@handle_errors
def zeroshot(
    images_dir: Path,
    names_file: Path | None,
    templates: str,
    single_prompt: str,
    confusions: int,
    per_class: bool,
    as_json: bool,
    fast_decode: bool,
    quiet: bool,
    **opts: Any,
) -> None:
    """Zero-shot top-1/top-5 accuracy: single prompt vs the prompt ensemble, per class, confusions."""
    from app.encoder import Encoder
    from app.evaluation import ImageOptions, evaluate_zeroshot, load_labelled_folder, prompt_sets

    settings = _settings(opts)
    prompt_sets(templates, single_prompt)  # type: ignore[arg-type]  # a bad --prompt fails before the model loads
    total = len(load_labelled_folder(images_dir, names_file).images)
    encoder = Encoder.from_settings(settings)
    with _progress(total, quiet, "encoding images") as progress:
        options = ImageOptions.from_settings(settings, draft=fast_decode, progress=progress)
        report = evaluate_zeroshot(
            encoder,
            images_dir,
            names_file=names_file,
            templates=templates,  # type: ignore[arg-type]
            single_prompt=single_prompt,
            confusions=confusions,
            images=options,
        )
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
        return
    click.echo(f"zero-shot: {report.images} images, {report.classes} classes ({report.images_dir})")
    click.echo(f"model:     {report.model}")
    click.echo("")
    click.echo(f"{'prompts':<20}{'top-1':>8}{'top-5':>8}{'mean/class':>12}")
    for result in report.results:
        name = f"{result.prompts} ({result.templates})"
        click.echo(f"{name:<20}{result.top1:>8.2f}{result.top5:>8.2f}{result.mean_per_class_top1:>12.2f}")
    chance = report.chance_top1
    click.echo(f"{'chance':<20}{chance:>8.2f}{report.chance_top5:>8.2f}{chance:>12.2f}")
    if len(report.results) == 2:
        single, ensemble = report.results
        deltas = (ensemble.top1 - single.top1, ensemble.top5 - single.top5)
        mean_delta = ensemble.mean_per_class_top1 - single.mean_per_class_top1
        click.echo(f"{'ensemble - single':<20}{deltas[0]:>+8.2f}{deltas[1]:>+8.2f}{mean_delta:>+12.2f}")
    last = report.results[-1]
    ranked = sorted(last.per_class_top1.items(), key=lambda item: (item[1], item[0]))
    if per_class:
        click.echo(f"\nper class, top-1 ({last.prompts}):")
        for name, value in ranked:
            click.echo(f"  {value:6.1f}  {name}")
    else:
        hardest = ", ".join(f"{name} {value:.0f}" for name, value in ranked[:5])
        click.echo(f"\nhardest classes ({last.prompts}, top-1 %): {hardest}")
    if last.confusions:
        click.echo(f"most confused ({last.prompts}): true -> predicted, images, share of the true class")
        for pair in last.confusions:
            click.echo(f"  {pair.true} -> {pair.predicted}: {pair.count} ({pair.share:.1f} %)")
    _print_skipped(report.skipped)


def _print_skipped(skipped: list[str]) -> None:
    if skipped:
        click.echo(f"\nskipped {len(skipped)} undecodable image(s), first: {skipped[0]}", err=True)
