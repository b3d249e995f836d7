"""Vocabularies: the built-in ImageNet and safe-search ones, user YAML/JSON files, and clear errors for bad ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from open_clip import zero_shot_metadata

from app.vocab import (
    SAFE_SEARCH_FLAGS,
    Vocabulary,
    VocabularyError,
    builtin_vocabulary,
    imagenet_vocabulary,
    load_vocabulary,
    parse_vocabulary,
    resolve_vocabulary,
    safe_search_vocabulary,
)

FOOD_YAML = """\
name: food
templates: ["a photo of {}, a type of food.", "a close-up photo of {}."]
threshold: 0.2
labels:
  - pizza
  - name: hot dog
    synonyms: [frankfurter]
    prompts: ["a hot dog in a bun with mustard."]
    threshold: 0.35
background: ["a photo of a restaurant."]
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_imagenet_vocabulary_is_open_clips_names_and_80_templates() -> None:
    vocab = imagenet_vocabulary()
    expected_templates = [template("{}") for template in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
    assert list(vocab.templates) == expected_templates and len(vocab.templates) == 80
    names = vocab.label_names()
    # open_clip lists "missile" and "sunglasses" twice; a tag is its name, so each is kept once, in order.
    assert names == list(dict.fromkeys(zero_shot_metadata.IMAGENET_CLASSNAMES)) and len(names) == 998
    prompts = vocab.label_prompts(vocab.labels[0])
    assert len(prompts) == 80 and "a photo of a tench." in prompts and all("tench" in p for p in prompts)


def test_the_built_in_vocabulary_is_read_without_importing_open_clip() -> None:
    """A no-op `clipsearch index` reads it to compute its tag key: open_clip's package import (torchvision,
    transformers) took 3.9 s there. In a fresh process, the same labels and templates as through open_clip."""
    code = (
        "import json, sys; from app.vocab import imagenet_vocabulary; v = imagenet_vocabulary(); "
        "print(json.dumps([v.label_names(), list(v.templates), 'open_clip' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, templates, imported_open_clip = json.loads(out.stdout)
    assert not imported_open_clip
    vocab = imagenet_vocabulary()  # here open_clip is imported: its own module
    assert names == vocab.label_names() and templates == list(vocab.templates) and len(templates) == 80


def test_template_presets_expand_to_the_open_clip_lists() -> None:
    assert parse_vocabulary({"templates": "single", "labels": ["cat"]}).templates == ("a photo of a {}.",)
    simple = parse_vocabulary({"templates": "simple", "labels": ["cat"]}).templates
    assert list(simple) == [t("{}") for t in zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES]
    assert len(parse_vocabulary({"labels": ["cat"]}).templates) == 80  # the ensemble is the default


def test_safe_search_flags_have_prompts_thresholds_and_background() -> None:
    vocab = safe_search_vocabulary()
    assert vocab.label_names() == ["nudity", "violence", "gore", "weapons", "medical"]
    assert vocab.thresholds() == [SAFE_SEARCH_FLAGS[name][0] for name in vocab.label_names()]
    assert all(0.0 < t < 1.0 for t in vocab.thresholds())
    assert not vocab.templates and all(len(label.prompts) >= 5 for label in vocab.labels)
    assert len(vocab.background) >= 10  # an ordinary photo needs somewhere to land other than a flag
    assert builtin_vocabulary("safe-search") == vocab and resolve_vocabulary("safe-search") == vocab


PERSON_WORDS = frozenset(
    {"man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "teen", "baby", "elderly", "old"}
    | {"young", "adult", "black", "white", "asian", "african", "arab", "indian", "latino", "hispanic", "caucasian"}
    | {"race", "ethnic", "gay", "lesbian", "male", "female", "criminal", "thief", "terrorist", "gangster"}
    | {"prisoner", "immigrant", "refugee", "poor", "homeless"}
)


def test_default_vocabularies_name_no_kind_of_person() -> None:
    """Class design decides who gets flagged: no default flag, prompt or background describes a person."""
    vocab = safe_search_vocabulary()
    texts = [*vocab.label_names(), *vocab.background, *(p for label in vocab.labels for p in label.prompts)]
    for text in texts:
        words = set(re.findall(r"[a-z]+", text.lower()))
        assert not words & PERSON_WORDS, f"person-describing word in safe-search text: {text!r}"


def test_user_yaml_with_synonyms_prompts_templates_and_thresholds(tmp_path: Path) -> None:
    vocab = load_vocabulary(_write(tmp_path, "food.yaml", FOOD_YAML))
    assert vocab.name == "food" and vocab.label_names() == ["pizza", "hot dog"]
    assert vocab.thresholds() == [0.2, 0.35]
    assert vocab.prompts_per_label() == [
        ["a photo of pizza, a type of food.", "a close-up photo of pizza."],
        [
            "a photo of hot dog, a type of food.",
            "a close-up photo of hot dog.",
            "a photo of frankfurter, a type of food.",
            "a close-up photo of frankfurter.",
            "a hot dog in a bun with mustard.",
        ],
    ]
    assert vocab.background == ("a photo of a restaurant.",)


def test_json_file_and_plain_label_list_are_accepted(tmp_path: Path) -> None:
    from_json = load_vocabulary(_write(tmp_path, "pets.json", '{"templates": "single", "labels": ["cat", "dog"]}'))
    from_list = load_vocabulary(_write(tmp_path, "pets.yml", "- cat\n- dog\n"))
    assert from_json.name == from_list.name == "pets"  # the file name when the file gives none
    assert from_json.prompts_per_label() == [["a photo of a cat."], ["a photo of a dog."]]
    assert from_list.label_names() == ["cat", "dog"] and len(from_list.templates) == 80


def test_content_hash_follows_the_encoded_text_only() -> None:
    base = {"name": "a", "templates": "single", "labels": ["cat", {"name": "dog", "threshold": 0.3}]}
    reference = parse_vocabulary(base).content_hash
    assert parse_vocabulary({**base, "name": "b", "threshold": 0.9}).content_hash == reference
    assert (
        parse_vocabulary({**base, "labels": ["cat", {"name": "dog", "synonyms": ["puppy"]}]}).content_hash != reference
    )
    assert parse_vocabulary({**base, "templates": "simple"}).content_hash != reference
    assert parse_vocabulary({**base, "background": ["a photo."]}).content_hash != reference


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("syntax.yaml", "labels:\n  - pizza\n  name: [\n", r"syntax\.yaml is not valid YAML: line 3, column"),
        ("syntax.json", '{"labels": ["a",]}', r"syntax\.json is not valid JSON: line 1, column 17"),
        (
            "threshold.yaml",
            "labels: [pizza, {name: soup, threshold: 1.5}]",
            r"labels\[1\] \('soup'\)\.threshold: Input should be less than or equal to 1 \(got 1\.5\)",
        ),
        (
            "template.yaml",
            "templates: ['a photo of {label}']\nlabels: [pizza]",
            r"template 'a photo of \{label\}' must contain '\{\}' exactly once",
        ),
        ("preset.yaml", "templates: imagenett\nlabels: [pizza]", r"'imagenett' is neither a template .* nor a preset"),
        ("twice.yaml", "labels: [Pizza, soup, pizza]", r"label 'pizza' appears twice \(labels\[0\] and labels\[2\]\)"),
        ("key.yaml", "labels: [{name: soup, colour: red}]", r"labels\[0\] \('soup'\)\.colour: unknown key 'colour'"),
        ("top.yaml", "lables: [soup]", r"unknown key 'lables'"),
        ("nolabels.yaml", "labels: []", r"labels: the vocabulary needs at least one label"),
        ("blank.yaml", "labels: ['  ']", r"labels\[0\]\.name: a label name must not be empty"),
        ("empty.yaml", "", r"empty.yaml is empty: it needs at least 'labels: \[...\]'"),
        ("scalar.yaml", "42", r"must hold a mapping with 'labels'"),
        ("noprompt.yaml", "templates: []\nlabels: [soup]", r"label 'soup' has no text to encode"),
    ],
)
def test_bad_vocabulary_files_name_the_file_and_the_problem(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(VocabularyError, match=expected) as info:
        load_vocabulary(path)
    assert str(path) in str(info.value)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "two.yaml", "threshold: -1\nlabels: [{name: a, threshold: 2}]")
    with pytest.raises(VocabularyError, match=r"invalid \(2 problems\): threshold: .*; labels\[0\] \('a'\)"):
        load_vocabulary(path)


def test_missing_file_and_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"vocabulary file .*nope\.yaml not found"):
        resolve_vocabulary(str(tmp_path / "nope.yaml"))
    with pytest.raises(VocabularyError, match=r"no built-in vocabulary 'food' \(known: imagenet, safe-search\)"):
        builtin_vocabulary("food")


def test_vocabulary_is_immutable() -> None:
    vocab = parse_vocabulary({"labels": ["cat"]})
    with pytest.raises(ValueError):
        vocab.threshold = 0.5  # type: ignore[misc]
    assert isinstance(vocab, Vocabulary)
