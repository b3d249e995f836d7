"""Multilingual models: a Hugging Face text tower with its own tokenizer, loaded through open_clip's own path.

The real models (xlm-roberta-base-ViT-B-32, nllb-clip-*) cannot be downloaded in tests, so a tiny random one is
built the same way: a 2-layer XLM-R config from ``transformers``, a Unigram tokenizer trained here with
``tokenizers`` on Spanish, French, Chinese, Korean and English sentences, and an open_clip config whose text_cfg
names them (``hf_model_name`` / ``hf_tokenizer_name``), saved as a ``local-dir:`` model folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import Settings
from app.encoder import Encoder
from app.errors import IndexMismatch
from app.search import SearchService
from app.store import Store
from indexer import Indexer

SENTENCES = [
    "una foto de un perro en la playa",
    "un gato durmiendo en el sofá",
    "una bicicleta roja junto a la pared",
    "une photo d'un chien sur la plage",
    "un chat qui dort sur le canapé",
    "une voiture bleue dans la rue",
    "海滩上的一只狗的照片",
    "睡在沙发上的猫",
    "街上的一辆蓝色汽车",
    "해변에 있는 개 사진",
    "소파에서 자는 고양이",
    "거리에 있는 파란 자동차",
    "a photo of a dog on the beach",
    "a cat sleeping on the sofa",
]
EMBED_DIM = 24


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails instead of downloading."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def save_tiny_multilingual_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP with an XLM-R-like Hugging Face text tower, as an open_clip ``local-dir:`` folder."""
    import open_clip
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig

    folder.mkdir(parents=True, exist_ok=True)
    special = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R's ids: 0, 1, 2, 3
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    # Every character of the sentences is in the vocabulary: no Chinese or Korean text becomes <unk>.
    alphabet = sorted(set("".join(SENTENCES)) - {" "})
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=special, unk_token="<unk>", initial_alphabet=alphabet
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(folder)
    XLMRobertaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    ).save_pretrained(folder)

    # As in open_clip's xlm-roberta-base-ViT-B-32.json, with the hub names replaced by this folder.
    model_cfg = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {
            "hf_model_name": str(folder),
            "hf_tokenizer_name": str(folder),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
        },
    }
    torch.manual_seed(seed)
    build_cfg = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "hf_model_pretrained": False}}
    model = open_clip.CustomTextCLIP(**build_cfg)  # type: ignore[arg-type]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess_cfg = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return folder


@pytest.fixture(scope="module")
def multilingual_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield save_tiny_multilingual_model(tmp_path_factory.mktemp("multilingual-model"))


@pytest.fixture(scope="module")
def multilingual_encoder(multilingual_dir: Path) -> Iterator[Encoder]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield Encoder.from_settings(Settings(model=f"local-dir:{multilingual_dir}", device="cpu"))


def test_multilingual_model_loads_with_its_own_tokenizer_and_hf_text_tower(multilingual_encoder: Encoder) -> None:
    import open_clip

    assert isinstance(multilingual_encoder.tokenizer, open_clip.tokenizer.HFTokenizer)
    assert multilingual_encoder.hf_text_model is not None
    assert multilingual_encoder.dim == EMBED_DIM
    # The tokenizer trained here knows these scripts: no query is reduced to unknown tokens.
    tokens = multilingual_encoder.tokenizer(["睡在沙发上的猫", "소파에서 자는 고양이"])
    assert not (tokens == 3).any()


def test_spanish_chinese_and_korean_queries_encode_to_distinct_unit_vectors(multilingual_encoder: Encoder) -> None:
    queries = ["un perro en la playa", "海滩上的狗", "해변에 있는 개", "un chat sur le canapé"]
    vectors = multilingual_encoder.encode_texts(queries)
    assert vectors.shape == (4, EMBED_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    off_diagonal = similarity[~np.eye(4, dtype=bool)]
    assert off_diagonal.max() < 0.9999, "different sentences must give different vectors"


def test_hf_text_tower_takes_the_full_encode_path(multilingual_encoder: Encoder, tiny_encoder: Encoder) -> None:
    assert tiny_encoder.supports_truncated_text  # open_clip's own causal tower: truncated fast path
    assert not multilingual_encoder.supports_truncated_text
    texts = ["una bicicleta roja", "街上的汽车", "거리에 있는 파란 자동차 사진"]
    # Without the fast path, truncate=True must mean exactly the model's own encode_text.
    tokens = multilingual_encoder.tokenizer(texts)
    with torch.inference_mode():
        reference = multilingual_encoder.model.encode_text(tokens).float().numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(multilingual_encoder.encode_texts(texts, truncate=True), reference, atol=1e-5)
    np.testing.assert_allclose(multilingual_encoder.encode_texts(texts, truncate=False), reference, atol=1e-5)


def test_text_in_one_batch_or_alone_gives_the_same_vector(multilingual_encoder: Encoder) -> None:
    """Padding to the batch must not change a vector (the HF tower masks the pad tokens)."""
    texts = ["un gato", "une voiture bleue dans la rue près de la plage", "猫"]
    batched = multilingual_encoder.encode_texts(texts)
    single = np.concatenate([multilingual_encoder.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_index_built_with_another_model_is_refused_then_re_embedded(
    settings: Settings, tiny_encoder: Encoder, multilingual_encoder: Encoder, photos: list[Path]
) -> None:
    folder = photos[0].parent
    store = Store(settings.effective_database_url)
    try:
        Indexer(settings, store, tiny_encoder, progress=False).run([folder])
        multilingual_settings = settings.with_overrides(model=multilingual_encoder.spec.name)

        service = SearchService(multilingual_settings, multilingual_encoder, store)
        with pytest.raises(IndexMismatch) as refused:
            service.load_index()
        message = str(refused.value)
        assert tiny_encoder.spec.name in message and multilingual_encoder.spec.name in message
        assert "clipsearch index" in message

        # Re-indexing with the new model is detected: every photo is embedded again, and search works.
        summary = Indexer(multilingual_settings, store, multilingual_encoder, progress=False).run([folder])
        assert summary.embedded == len(photos) and summary.index_count == len(photos)
        service.load_index()
        hits = service.search_text("una foto de un perro en la playa", k=5)
        assert len(hits) == 5 and all(Path(h.path).parent == folder for h in hits)
    finally:
        store.close()


def test_missing_hf_text_model_says_what_to_do(multilingual_dir: Path, tmp_path: Path) -> None:
    """A text tower that is neither cached nor reachable (offline) fails with the fix, not a bare traceback."""
    import shutil

    from app.errors import ModelLoadError

    broken = tmp_path / "broken-model"
    shutil.copytree(multilingual_dir, broken)
    config = json.loads((broken / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "clipsearch-test/no-such-text-model"
    (broken / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="(?s)Hugging Face model .clipsearch-test/no-such-text-model.*HF_HOME"):
        Encoder.from_settings(Settings(model=f"local-dir:{broken}", device="cpu"))
