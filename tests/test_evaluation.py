"""Built-in evaluation: metrics on hand-computed cases, data loading, `clipsearch eval` and the instrument model's
published Caltech-101 figures."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from app.cli import main
from app.encoder import Encoder
from app.evaluation import (
    ConfusionPair,
    EvaluationError,
    chance_recall,
    confusion_pairs,
    evaluate_retrieval,
    evaluate_zeroshot,
    load_captions,
    load_labelled_folder,
    per_class_accuracy,
    ranks_of_relevant,
    recall_at_k,
    topk_accuracy,
)

# Figures of ../shared/models/README.md ("Measured figures"), Caltech-101 all 3,345 images, in percent.
README_CALTECH = {"single": (56.74, 76.08), "ensemble": (57.01, 76.05)}

# --- metrics on hand-computed cases ---


def test_recall_at_k_on_a_small_similarity_matrix() -> None:
    similarity = np.array([[0.9, 0.1, 0.5, 0.2], [0.3, 0.2, 0.8, 0.4], [0.4, 0.4, 0.1, 0.0]])
    relevant = np.zeros((3, 4), dtype=bool)
    relevant[[0, 1, 2], [0, 1, 1]] = True
    # query 0: its item is best (rank 0); query 1: three wrong items score higher (rank 3);
    # query 2: a wrong item ties with its item, and ties count against (rank 1).
    assert ranks_of_relevant(similarity, relevant).tolist() == [0, 3, 1]
    assert recall_at_k(similarity, relevant, (1, 2, 3, 4)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 2 / 3, 4: 1.0})


def test_recall_counts_a_hit_when_any_relevant_item_is_in_the_top_k() -> None:
    similarity = np.array([[0.3, 0.2, 0.8, 0.4]])
    relevant = np.array([[False, True, True, False]])  # an image with two captions: the best one counts
    assert ranks_of_relevant(similarity, relevant).tolist() == [0]
    assert ranks_of_relevant(similarity, np.zeros((1, 4), dtype=bool)).tolist() == [4]  # nothing relevant: a miss


def test_a_constant_model_scores_nothing_not_everything() -> None:
    similarity = np.zeros((5, 5))
    assert recall_at_k(similarity, np.eye(5, dtype=bool), (1, 4, 5)) == {1: 0.0, 4: 0.0, 5: 1.0}


def test_topk_accuracy_per_class_accuracy_and_confusion_pairs() -> None:
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = np.array([0, 2, 2, 1])
    assert topk_accuracy(logits, labels, (1, 2, 3)) == pytest.approx({1: 0.5, 2: 1.0, 3: 1.0})

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predictions = np.array([0, 1, 1, 0, 1, 1, 1, 0, 2])
    accuracy = per_class_accuracy(predictions, labels, 4)
    np.testing.assert_allclose(accuracy[:3], [1 / 3, 1 / 2, 1 / 4])
    assert np.isnan(accuracy[3])  # a class without images has no accuracy, not zero
    assert confusion_pairs(predictions, labels, ["a", "b", "c", "d"], top=3) == [
        ConfusionPair("a", "b", 2, pytest.approx(200 / 3)),
        ConfusionPair("c", "b", 2, pytest.approx(50.0)),
        ConfusionPair("b", "a", 1, pytest.approx(50.0)),
    ]
    assert confusion_pairs(labels, labels, ["a", "b", "c", "d"]) == []


def test_chance_levels() -> None:
    assert chance_recall(79, 1, 10) == pytest.approx(10 / 79)
    assert chance_recall(395, 5, 1) == pytest.approx(5 / 395)
    assert chance_recall(4, 2, 2) == pytest.approx(1 - 1 / 6)  # both picks wrong: C(2,2)/C(4,2)
    assert chance_recall(10, 1, 20) == 1.0


# --- data sets ---


def test_captions_from_csv_and_coco_json_are_the_same_set(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "c.csv").write_text('image,caption\nb.jpg,"a dog, running"\na.jpg,a cat\nb.jpg,"  a  dog\n"\n')
    coco = {
        "images": [{"id": 7, "file_name": "b.jpg"}, {"id": 3, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 7, "caption": "a dog, running"},
            {"image_id": 3, "caption": "a cat"},
            {"image_id": 7, "caption": "a dog"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    from_csv, from_json = load_captions(tmp_path / "c.csv", tmp_path), load_captions(tmp_path / "c.json", tmp_path)
    for data in (from_csv, from_json):
        assert [p.name for p in data.images] == ["b.jpg", "a.jpg"]
        assert data.captions == ["a dog, running", "a cat", "a dog"]
        assert data.caption_image.tolist() == [0, 1, 0]


def test_caption_files_with_problems_say_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "missing.csv").write_text("image,caption\nx.jpg,one\ny.jpg,two\n")
    with pytest.raises(EvaluationError, match=r"2 of the 2 images named in .*missing.csv are not in .*: x.jpg, y.jpg"):
        load_captions(tmp_path / "missing.csv", tmp_path)
    (tmp_path / "header.csv").write_text("file,text\nx.jpg,one\n")
    with pytest.raises(EvaluationError, match=r"header naming the columns 'image' and 'caption' \(found: file, text\)"):
        load_captions(tmp_path / "header.csv", tmp_path)
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(EvaluationError, match=r"not COCO-style JSON .*missing 'annotations'"):
        load_captions(tmp_path / "bad.json", tmp_path)


def test_labelled_folder_classes_are_sorted_sub_folders_with_mapped_names(tmp_path: Path) -> None:
    for folder, count in (("zebra_fish", 2), ("Faces", 1), ("empty", 0), (".hidden", 1)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "Faces" / "notes.txt").write_text("not an image")
    (tmp_path / "names.json").write_text('{"Faces": "face", "unused": "x"}')
    data = load_labelled_folder(tmp_path, tmp_path / "names.json")
    assert data.folders == ["Faces", "zebra_fish"] and data.class_names == ["face", "zebra fish"]
    assert data.labels.tolist() == [0, 1, 1] and [p.name for p in data.images] == ["0.png", "0.png", "1.png"]
    (tmp_path / "bad.json").write_text('["Faces"]')
    with pytest.raises(EvaluationError, match=r"must be a JSON object of folder -> name"):
        load_labelled_folder(tmp_path, tmp_path / "bad.json")
    shutil.rmtree(tmp_path / "zebra_fish")
    with pytest.raises(EvaluationError, match=r"needs at least two sub-folders of images .* found 1"):
        load_labelled_folder(tmp_path)


# --- evaluation end to end with an encoder whose answers are known ---


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


class ColourEncoder:
    """Images embed as their mean colour, a caption as the colour it names: the right answer is known."""

    image_size = 8
    dim = 3

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))

    def encode_pixels(self, batch: torch.Tensor) -> np.ndarray:
        vectors = batch.numpy()
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        vectors = np.array([next(v for k, v in COLOURS.items() if k in t) for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_retrieval_finds_each_captions_own_image_with_a_perfect_encoder(tmp_path: Path) -> None:
    lines = ["image,caption"]
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{name}.png")
    for name in ["blue", "red", "yellow", "green", "red", "yellow", "blue", "green"]:  # shuffled, 2 per image
        lines.append(f"{name}.png,a {name} square")
    (tmp_path / "captions.csv").write_text("\n".join(lines))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    report = evaluate_retrieval(ColourEncoder(), tmp_path / "captions.csv", tmp_path)
    assert (report.images, report.captions) == (4, 8)
    assert report.text_to_image == {1: 100.0, 5: 100.0, 10: 100.0}
    assert report.image_to_text == {1: 100.0, 5: 100.0, 10: 100.0}
    assert report.chance_text_to_image[1] == pytest.approx(25.0) and report.median_rank_text_to_image == 1


def test_zeroshot_classifies_a_folder_and_reports_undecodable_files(tmp_path: Path) -> None:
    for name, rgb in COLOURS.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), tuple(max(0, c - 20 * i) for c in rgb)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "red" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    report = evaluate_zeroshot(ColourEncoder(), tmp_path, templates="both")
    assert (report.images, report.classes, len(report.skipped)) == (12, 4, 1)
    assert "broken.jpg" in report.skipped[0]
    assert [(r.prompts, r.templates, r.top1) for r in report.results] == [("single", 1, 100.0), ("ensemble", 80, 100.0)]
    assert report.chance_top1 == 25.0 and report.chance_top5 == 100.0


# --- the CLI on a small real folder (tiny random-weight model) ---


@pytest.fixture(scope="module")
def small_caltech(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("small-caltech")
    for folder in ("Leopards", "airplanes", "car_side"):
        (root / folder).mkdir()
        for src in sorted((shared_data / "caltech101" / folder).glob("*.jpg"))[:4]:
            shutil.copy2(src, root / folder / src.name)
    (root / "car_side" / "empty.jpg").write_bytes(b"")
    (root / "names.json").write_text('{"car_side": "side of a car", "Leopards": "leopard"}')
    return root


def _model_args(model_dir: Path) -> list[str]:
    return ["--model", f"local-dir:{model_dir}", "--device", "cpu", "--batch-size", "64"]


def test_cli_zeroshot_prints_single_and_ensemble_side_by_side(small_caltech: Path, tiny_model_dir: Path) -> None:
    runner = CliRunner()
    args = ["eval", "zeroshot", "--images", str(small_caltech), "--names", str(small_caltech / "names.json")]
    result = runner.invoke(main, [*args, *_model_args(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["classes"]) == (12, 3)
    assert report["class_names"] == ["leopard", "airplanes", "side of a car"]
    assert [(r["prompts"], r["templates"]) for r in report["results"]] == [("single", 1), ("ensemble", 80)]
    assert len(report["skipped"]) == 1 and "empty.jpg" in report["skipped"][0]
    assert set(report["results"][0]["per_class_top1"]) == set(report["class_names"])

    result = runner.invoke(main, [*args, *_model_args(tiny_model_dir), "--per-class"])
    assert result.exit_code == 0, result.output
    for text in ("single (1)", "ensemble (80)", "chance", "ensemble - single", "per class, top-1 (ensemble)"):
        assert text in result.stdout
    assert "skipped 1 undecodable image(s)" in result.stderr

    result = runner.invoke(main, [*args, *_model_args(tiny_model_dir), "--templates", "single"])
    assert result.exit_code == 0 and "ensemble" not in result.stdout


def test_cli_retrieval_json_and_table(tmp_path: Path, shared_data: Path, tiny_model_dir: Path) -> None:
    source = shared_data / "coco-mini"
    with (source / "captions.csv").open(newline="") as file:
        rows = list(csv.reader(file))
    names = sorted({image for image, _ in rows[1:]})[:6]
    with (tmp_path / "captions.csv").open("w", newline="") as file:
        csv.writer(file).writerows([rows[0], *(row for row in rows[1:] if row[0] in names)])
    runner = CliRunner()
    args = ["eval", "retrieval", "--captions", str(tmp_path / "captions.csv"), "--images", str(source / "images")]
    result = runner.invoke(main, [*args, *_model_args(tiny_model_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["captions"]) == (6, 30)
    assert set(report["text_to_image"]) == {"1", "5", "10"} and report["text_to_image"]["10"] == 100.0
    result = runner.invoke(main, [*args, *_model_args(tiny_model_dir)])
    assert result.exit_code == 0 and "text -> image" in result.stdout and "image -> text" in result.stdout


def test_cli_errors_exit_2_with_a_message(tmp_path: Path, tiny_model_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "retrieval", "--captions", str(tmp_path / "x.csv"), "--images", "."])
    assert result.exit_code == 2 and "error: captions file" in result.stderr and "not found" in result.stderr
    result = runner.invoke(main, ["eval", "zeroshot", "--images", str(tmp_path), "--prompt", "a photo"])
    assert result.exit_code == 2 and "must contain '{}' once" in result.stderr
    result = runner.invoke(main, ["eval", "zeroshot", "--images", str(tmp_path / "none"), *_model_args(tiny_model_dir)])
    assert result.exit_code == 2 and "image folder" in result.stderr


# --- the harness itself: random weights at chance, the trained model at its published figures ---


def test_random_weights_score_at_chance(tiny_encoder: Encoder, shared_data: Path) -> None:
    """A random-weight model must come out at chance on CIFAR-10 (10 classes, 200 each): a test of the harness."""
    report = evaluate_zeroshot(tiny_encoder, shared_data / "cifar10-test", templates="single")
    result = report.result("single")
    assert report.images == 2000 and report.chance_top1 == 10.0
    assert abs(result.top1 - 10.0) < 3.5, result.top1  # 200 per class: mean per class = top-1
    assert abs(result.top5 - 50.0) < 6.0, result.top5


@pytest.fixture(scope="session")
def instrument_caltech_report(instrument_model_dir: Path, shared_data: Path) -> dict:
    """`clipsearch eval zeroshot` on all of Caltech-101 with the trained model, run once."""
    folder = shared_data / "caltech101"
    args = ["eval", "zeroshot", "--images", str(folder), "--names", str(folder / "classnames.json"), "--json", "-q"]
    result = CliRunner().invoke(main, [*args, *_model_args(instrument_model_dir), "--batch-size", "128"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("prompts", ["single", "ensemble"])
def test_instrument_model_matches_its_published_caltech101_figures(
    instrument_caltech_report: dict, prompts: str
) -> None:
    """../shared/models/README.md: single prompt 56.74 / 76.08, ensemble 57.01 / 76.05 (top-1 / top-5)."""
    report = instrument_caltech_report
    assert (report["images"], report["classes"], report["skipped"]) == (3345, 101, [])
    result = next(r for r in report["results"] if r["prompts"] == prompts)
    top1, top5 = README_CALTECH[prompts]
    assert abs(result["top1"] - top1) <= 1.0, result["top1"]
    assert abs(result["top5"] - top5) <= 1.0, result["top5"]
    assert result["mean_per_class_top1"] > 30 * report["chance_top1"]
