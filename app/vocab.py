"""Label vocabularies for zero-shot tagging and safe-search flags: built-in ones and user files.

A :class:`Vocabulary` is what the text encoder turns into a classifier (see ``app.zeroshot``): labels, each
with optional synonyms and full-sentence prompts, the templates that put a name into a sentence
("a photo of a {}."), a default score threshold with per-label overrides, and optional *background* prompts
(classes that are scored but never returned: "none of the labels").

Built-in vocabularies (:func:`builtin_vocabulary`):

- ``imagenet``: the 1,000 ImageNet class names and the 80 prompt templates of the CLIP paper, imported from
  ``open_clip.zero_shot_metadata`` (not copied). Two names occur twice there ("missile", "sunglasses"); a tag
  is its name, so each is kept once (998 labels). Threshold 0.1: a softmax score 100x the 1/1,000 of chance.
- ``safe-search``: sensitive-content flags (nudity, violence, gore, weapons, medical), each a set of
  full-sentence prompts with its own threshold, scored against neutral background prompts (everyday scenes,
  clothed people, animals, food, kitchen knives, toys...) so that an ordinary photo lands on the background
  rather than on the closest flag. No label describes a person: flags name content, never who is shown.

Safe-search thresholds are softmax shares over the flags and the background at the model's own temperature:
0.5 means "this flag outweighs every other class put together".
- nudity 0.5, gore 0.5: the most harmful to show unasked, so a flag is set as soon as it wins that majority;
- violence 0.6, weapons 0.6: many benign look-alikes (sports, martial arts, toys, tools, kitchen knives, hunting
  or museum pieces), so more confidence is asked;
- medical 0.7: the least harmful and the most common in ordinary photos (doctors, pharmacies, x-rays, plasters),
  so only clear cases are hidden.
They are not calibrated on labelled sensitive images (none are available offline here); on benign sets the
instrument model flags 14 of 3,345 Caltech-101 photos (all "gore") and none of CIFAR-10, Fashion-MNIST or COCO-mini
(benchmarks/results/evaluation.md). Zero-shot flags are approximate: tune per flag with settings overrides.

User vocabularies (:func:`load_vocabulary`) are YAML or JSON::

    name: food                                   # optional; default: the file name
    templates: ["a photo of {}, a type of food."]  # optional; or a preset: imagenet | simple | single
    threshold: 0.2                               # optional default for every label (0..1)
    labels:
      - pizza                                    # a plain name
      - name: hot dog
        synonyms: [frankfurter]                  # also put into every template
        prompts: ["a hot dog in a bun with mustard."]  # used as they are
        threshold: 0.3
    background: ["a photo of a restaurant."]     # optional "none of these" prompts

A file holding just a list is read as the labels. Problems raise :class:`VocabularyError` naming the file,
the place in it (``labels[2].threshold``) and what to change.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import ConfigError

SINGLE_TEMPLATE = "a photo of a {}."


@functools.cache
def _zero_shot_metadata() -> ModuleType:
    """open_clip's ``zero_shot_metadata`` module (plain data: ImageNet's class names and the templates), read from
    its file without importing the ``open_clip`` package, whose import pulls in torchvision and transformers: 3.9 s
    of a 6 s no-op ``clipsearch index`` that tags with the built-in vocabulary and needs no model."""
    loaded = sys.modules.get("open_clip.zero_shot_metadata")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("open_clip")
    if package is None or package.origin is None:
        raise VocabularyError("the built-in ImageNet vocabulary needs open_clip_torch: pip install open_clip_torch")
    spec = importlib.util.spec_from_file_location(
        "clipsearch._open_clip_zero_shot_metadata", Path(package.origin).with_name("zero_shot_metadata.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _open_clip_templates(name: str) -> tuple[str, ...]:
    """open_clip ships its templates as functions of the class name; turn them back into '{}' strings."""
    return tuple(template("{}") for template in getattr(_zero_shot_metadata(), name))


def imagenet_classnames() -> tuple[str, ...]:
    return tuple(_zero_shot_metadata().IMAGENET_CLASSNAMES)


def imagenet_templates() -> tuple[str, ...]:
    """The 80 templates of the CLIP paper's ImageNet ensemble (open_clip's OPENAI_IMAGENET_TEMPLATES)."""
    return _open_clip_templates("OPENAI_IMAGENET_TEMPLATES")


def simple_templates() -> tuple[str, ...]:
    """open_clip's short list of 7 templates (SIMPLE_IMAGENET_TEMPLATES)."""
    return _open_clip_templates("SIMPLE_IMAGENET_TEMPLATES")


TEMPLATE_PRESETS = {
    "imagenet": imagenet_templates,
    "simple": simple_templates,
    "single": lambda: (SINGLE_TEMPLATE,),
}

DEFAULT_THRESHOLD = 0.1


class VocabularyError(ConfigError):
    """A vocabulary file that cannot be read or is invalid."""


def _clean_text(value: str, what: str) -> str:
    text = " ".join(str(value).split())
    if not text:
        raise ValueError(f"{what} must not be empty")
    if len(text) > 300:
        raise ValueError(f"{what} is {len(text)} characters long; keep it under 300")
    return text


class Label(BaseModel):
    """One label: its name (what is stored and shown), synonyms and prompts that help recognise it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    synonyms: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _from_plain_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _clean_text(value, "a label name")

    @field_validator("synonyms", "prompts", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("synonyms")
    @classmethod
    def _check_synonyms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_clean_text(s, "a synonym") for s in value))

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_clean_text(p, "a prompt") for p in value))


class Vocabulary(BaseModel):
    """Labels plus how to phrase them; immutable, hashable by content (see :attr:`content_hash`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    templates: tuple[str, ...] = Field(default_factory=imagenet_templates)
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    labels: tuple[Label, ...] = Field(min_length=1)
    background: tuple[str, ...] = ()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return _clean_text(value, "the vocabulary name")

    @field_validator("templates", mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value in TEMPLATE_PRESETS:
                return TEMPLATE_PRESETS[value]()
            if "{}" not in value:
                presets = ", ".join(TEMPLATE_PRESETS)
                raise ValueError(f"'{value}' is neither a template with '{{}}' nor a preset ({presets})")
            return [value]
        return value

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for template in value:
            rest = template.replace("{}", "", 1)
            if "{}" not in template or "{" in rest or "}" in rest:
                raise ValueError(
                    f"template '{template}' must contain '{{}}' exactly once (where the label goes) "
                    "and no other braces, e.g. 'a photo of a {}.'"
                )
            _clean_text(template, "a template")
        return tuple(dict.fromkeys(value))

    @field_validator("background", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("background")
    @classmethod
    def _check_background(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_clean_text(p, "a background prompt") for p in value))

    @model_validator(mode="after")
    def _check_labels(self) -> Vocabulary:
        seen: dict[str, int] = {}
        for position, label in enumerate(self.labels):
            key = label.name.casefold()
            if key in seen:
                raise ValueError(
                    f"label '{label.name}' appears twice (labels[{seen[key]}] and labels[{position}]): "
                    "merge them, using synonyms for the other wording"
                )
            seen[key] = position
            if not self.templates and not label.prompts:
                raise ValueError(
                    f"label '{label.name}' has no text to encode: give the vocabulary templates or the label prompts"
                )
        return self

    # --- what the encoder needs ---

    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def label_prompts(self, label: Label) -> list[str]:
        """Every sentence whose embedding is averaged into the label's class embedding."""
        names = (label.name, *label.synonyms)
        filled = [template.replace("{}", name) for name in names for template in self.templates]
        return list(dict.fromkeys([*filled, *label.prompts]))

    def prompts_per_label(self) -> list[list[str]]:
        return [self.label_prompts(label) for label in self.labels]

    def thresholds(self) -> list[float]:
        return [self.threshold if label.threshold is None else label.threshold for label in self.labels]

    @property
    def content_hash(self) -> str:
        """Hash of what determines the class embeddings (the texts encoded), not of names or thresholds."""
        payload = json.dumps(
            {"v": 1, "labels": self.prompts_per_label(), "background": list(self.background)},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()


# --- built-in vocabularies ---


def imagenet_vocabulary(templates: Sequence[str] | str = "imagenet") -> Vocabulary:
    """ImageNet-1k class names (as open_clip ships them, duplicates kept once) with the 80 CLIP templates."""
    names = list(dict.fromkeys(imagenet_classnames()))
    return Vocabulary.model_validate({"name": "imagenet", "templates": templates, "threshold": 0.1, "labels": names})


# Flags name kinds of content. None describes a person (no age, gender, ethnicity, occupation, character):
# class design decides who gets flagged, and person classes are how zero-shot classifiers turn biased.
SAFE_SEARCH_FLAGS: dict[str, tuple[float, tuple[str, ...]]] = {
    # threshold: the flag's softmax share against every other flag and the background, above which it is set.
    "nudity": (
        0.5,
        (
            "a photo containing nudity.",
            "a photo of a naked body.",
            "an explicit pornographic image.",
            "a photo of exposed genitals.",
            "a topless photo.",
            "an image of sexual activity.",
        ),
    ),
    "violence": (
        0.6,
        (
            "a photo of a violent assault.",
            "a photo of a brutal fight with someone being beaten.",
            "a photo of a violent riot.",
            "a photo of an armed attack.",
            "a photo of torture.",
        ),
    ),
    "gore": (
        0.5,
        (
            "a photo of gore.",
            "a photo of a bloody wound.",
            "a photo of a mutilated body.",
            "a photo of a corpse covered in blood.",
            "a graphic photo of a severe injury.",
        ),
    ),
    "weapons": (
        0.6,
        (
            "a photo of a gun.",
            "a photo of a handgun.",
            "a photo of a rifle.",
            "a photo of firearms and ammunition.",
            "a photo of a knife held as a weapon.",
        ),
    ),
    "medical": (
        0.7,
        (
            "a photo of a surgical operation.",
            "a photo of an open surgical incision.",
            "a close-up medical photo of a skin disease.",
            "a photo of a syringe needle in skin.",
            "a graphic medical photo.",
        ),
    ),
}

SAFE_SEARCH_BACKGROUND: tuple[str, ...] = (
    "a photo.",
    "an ordinary everyday photo.",
    "a photo of people wearing clothes.",
    "a photo of a group of people.",
    "a photo of people at the beach in swimwear.",
    "a photo of a sports match.",
    "a photo of a landscape.",
    "a photo of a city street.",
    "a photo of a building.",
    "a photo of a room.",
    "a photo of food.",
    "a photo of an animal.",
    "a photo of a plant.",
    "a photo of a vehicle.",
    "a photo of a household object.",
    "a photo of a kitchen knife on a cutting board.",
    "a photo of a toy.",
    "a photo of a painting.",
    "a screenshot of text.",
    "a photo of a doctor's office.",
)


def safe_search_vocabulary() -> Vocabulary:
    """The default safe-search flags with their thresholds, scored against neutral background prompts."""
    labels = [{"name": name, "prompts": prompts, "threshold": t} for name, (t, prompts) in SAFE_SEARCH_FLAGS.items()]
    data = {"name": "safe-search", "templates": [], "threshold": 0.5, "labels": labels}
    return Vocabulary.model_validate({**data, "background": SAFE_SEARCH_BACKGROUND})


BUILTIN_VOCABULARIES = {"imagenet": imagenet_vocabulary, "safe-search": safe_search_vocabulary}


def builtin_vocabulary(name: str) -> Vocabulary:
    try:
        return BUILTIN_VOCABULARIES[name]()
    except KeyError:
        known = ", ".join(BUILTIN_VOCABULARIES)
        raise VocabularyError(f"no built-in vocabulary '{name}' (known: {known}); or give a YAML/JSON file") from None


def resolve_vocabulary(spec: str | Path) -> Vocabulary:
    """A built-in vocabulary by name (``imagenet``, ``safe-search``) or a user file by path."""
    if isinstance(spec, str) and spec in BUILTIN_VOCABULARIES:
        return builtin_vocabulary(spec)
    return load_vocabulary(Path(spec))


# --- user files ---


def load_vocabulary(path: Path) -> Vocabulary:
    """Read and validate a YAML or JSON vocabulary file; raise VocabularyError naming the file and the problem."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VocabularyError(f"vocabulary file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"vocabulary file {path} cannot be read: {exc}") from exc
    data = _parse(text, path)
    return parse_vocabulary(data, source=f"vocabulary file {path}", default_name=path.stem)


def parse_vocabulary(data: Any, *, source: str = "vocabulary", default_name: str = "custom") -> Vocabulary:
    """Validate already-parsed data (a mapping, or a list of labels) into a Vocabulary."""
    if isinstance(data, list):
        data = {"labels": data}
    if data is None:
        raise VocabularyError(f"{source} is empty: it needs at least 'labels: [...]'")
    if not isinstance(data, dict):
        raise VocabularyError(
            f"{source} must hold a mapping with 'labels' (or a list of labels), not {type(data).__name__} data"
        )
    data = {"name": default_name, **data}
    try:
        return Vocabulary.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # An invalid label also makes pydantic call the label list too short: report the cause only.
        inner = {error["loc"][0] for error in errors if len(error["loc"]) > 1}
        errors = [e for e in errors if not (e["type"] == "too_short" and len(e["loc"]) == 1 and e["loc"][0] in inner)]
        problems = "; ".join(_describe(error, data) for error in errors)
        count = len(errors)
        raise VocabularyError(f"{source} is invalid ({count} problem{'s' if count > 1 else ''}): {problems}") from None


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise VocabularyError(
                f"vocabulary file {path} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        raise VocabularyError(f"vocabulary file {path} is not valid YAML: {where}{what}") from None
    except yaml.YAMLError as exc:
        raise VocabularyError(f"vocabulary file {path} is not valid YAML: {exc}") from None


def _describe(error: Any, data: dict[str, Any]) -> str:
    """One pydantic error as 'labels[2] ('hot dog').threshold: Input should be ... (got 1.5)'."""
    loc: list[str] = []
    node: Any = data
    for part in error["loc"]:
        if isinstance(part, int):
            loc.append(f"[{part}]")
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("name"), str):
                loc.append(f" ('{node['name']}')")
        else:
            loc.append(f".{part}" if loc else str(part))
            node = node.get(part) if isinstance(node, dict) else None
    message = str(error["msg"]).removeprefix("Value error, ")
    where = "".join(loc)
    got = error.get("input")
    scalar = isinstance(got, str | int | float | bool) or got is None
    shown = f" (got {got!r})" if error["type"] not in ("value_error", "missing") and scalar else ""
    if error["type"] == "too_short" and error["loc"] == ("labels",):
        return "labels: the vocabulary needs at least one label"
    if error["type"] == "extra_forbidden":
        in_label = len(error["loc"]) > 2 and error["loc"][0] == "labels"
        allowed = ", ".join((Label if in_label else Vocabulary).model_fields)
        return f"{where}: unknown key '{error['loc'][-1]}' (allowed here: {allowed})"
    return f"{where}: {message}{shown}" if where else f"{message}{shown}"
