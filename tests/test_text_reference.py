"""Reference parity for text models (servetool/convert/reference/text.py): `package` compares the archive's
handler, in-process, with transformers' and sentence-transformers' own inference, and stops on a
tokenizer that differs from the one transformers builds, naming the text and the stage.

Real libraries and models only: all-MiniLM-L6-v2 (models/minilm) from a folder outside the repo,
an XLM-R-style SentencePiece Unigram tokenizer trained here with `sentencepiece`, and small models
built from config with random weights.

Two tests go through `package` whole (gate, archive, pre-flight, then the reference check that
keeps a failing archive out of the store); the others run the reference check alone
(`library_check`) on the exported model, since the gate and the archive are not their subject and
cost more than the check (zipping MiniLM's 90 MB alone takes 5-12 s here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from servetool.convert import export, reference
from servetool.convert.reference import ReferenceMismatch
from servetool.convert.reference.text import HARD_TEXTS
from servetool.engines.torchserve import archive
from servetool.model.spec import ModelSpec, load_spec
from servetool.operate.package import package
from tests.conftest import ROOT
from tests.test_text_heads import LABELS8, bert_folder

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

MINILM = ROOT / "models" / "minilm" / "model"
TRAINING = ROOT / "servetool" / "resources" / "sentences.txt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the libraries and the served runtime (which takes the cores per
    worker): on cores shared with other jobs, a second OpenMP thread waits for a busy core far
    longer than it saves (this module on 2 busy cores: 44-65 s with two threads, 15-23 s with
    one)."""
    patch = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    patch.setattr("handlers.runtimes.available_cores", lambda: 1)
    yield
    patch.undo()
    torch.set_num_threads(threads)


def spec_dir(root: Path, folder: Path, task: str, **fields) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    # torchscript: traced in seconds; the reference compares whatever format is served
    raw = {"name": "ref", "source": {"transformers": str(folder)}, "task": task,
           "format": "torchscript",
           "workers": {"min": 1, "max": 1}, **fields}
    (root / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def library_check(spec: ModelSpec, work: Path, lines: list[str] | None = None) -> list[str]:
    """What `package`'s reference step says for `spec` (servetool.convert.reference.check, as package
    calls it, with the handler run in-process) without the gate, the archive and the pre-flight:
    the spec's format exported into `work`, where the handler finds the files the archive would
    hold beside the artifact (the tokenizer, labels.txt) under the names its model-config gives."""
    artifact = export.export(spec, export.load_original(spec), work, spec.format)
    config = archive.model_config(spec, artifact)
    handler = config["handler"]
    assert artifact.path.parent == work and all(f.parent == work for f in artifact.files)
    if handler["text"]:
        shutil.copyfile(spec.text.tokenizer, work / handler["text"]["tokenizer"])
    if handler["labels"]:
        (work / handler["labels"]).write_text("\n".join(spec.label_names()) + "\n")
    return reference.check(spec, work, config, (lines if lines is not None else []).append)


def test_minilm_from_a_folder_outside_the_repo_matches_sentence_transformers(tmp_path):
    if not (MINILM / "config.json").is_file():
        pytest.fail("models/minilm/model is missing: run models/minilm/make_model.sh")
    folder = tmp_path / "downloads" / "all-MiniLM-L6-v2"
    shutil.copytree(MINILM, folder)
    lines: list[str] = []
    spec = load_spec(spec_dir(tmp_path / "work", folder, "feature-extraction"))
    (line,) = library_check(spec, tmp_path / "export", lines)
    assert line.startswith("embeddings match sentence-transformers"), line
    cosine = float(line.split("cosine >= ")[1].split()[0])
    assert 0.9999 <= cosine <= 1.0000001, line
    assert "tokenization equal on" in line and "past max_length 256" in line
    assert lines == [f"ref: reference: {line}"]


# --- an XLM-R-style SentencePiece Unigram tokenizer --------------------------------------------

def _sentencepiece_vocab(tmp: Path) -> tuple[list[tuple[str, float]], bytes]:
    """A tiny Unigram model trained on servetool's sentences (NFKC charsmap, as XLM-R's)."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2

    lines = [t for t in TRAINING.read_text(encoding="utf-8").splitlines() if t] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp / "sp"),
                                   vocab_size=300, hard_vocab_limit=False, model_type="unigram",
                                   character_coverage=1.0, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp / "sp.model").read_bytes())
    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq's order, as XLM-R's
    vocab = [(s, 0.0) for s in specials] + [(p.piece, p.score) for p in proto.pieces
                                             if p.piece not in specials] + [("<mask>", 0.0)]
    return vocab, proto.normalizer_spec.precompiled_charsmap


def xlmr_folder(tmp: Path, head: str) -> Path:
    """A 1-layer XLM-R (random weights) with the SentencePiece tokenizer, as save_pretrained
    writes it with this transformers."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizer

    vocab, charsmap = _sentencepiece_vocab(tmp)
    tokenizer = XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap)
    config = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=130, id2label={0: "no", 1: "yes"},
                              label2id={"no": 0, "yes": 1})
    torch.manual_seed(0)
    folder = tmp / f"xlmr-{head}"
    XLMRobertaForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def as_transformers_4_saved_it(folder: Path) -> None:
    """tokenizer.json in the shape transformers 4's XLM-R converter wrote (hub folders hold it):
    the charsmap then Replace(" {2,}", " ") as normalizer, a Metaspace pre-tokenizer (no
    WhitespaceSplit). transformers 5 rebuilds both from XLMRobertaTokenizer's class."""
    path = folder / "tokenizer.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["normalizer"] = {"type": "Sequence", "normalizers": [
        saved["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    saved["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                              "split": True}
    path.write_text(json.dumps(saved, ensure_ascii=False), encoding="utf-8")


def _differing_hard_texts(folder: Path) -> list[str]:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    worker = Tokenizer.from_file(str(folder / "tokenizer.json"))
    worker.no_padding()
    library = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return [t for t in HARD_TEXTS if worker.encode(t).ids != library(t)["input_ids"]]


def test_xlmr_sentencepiece_tokenizer_parity_is_checked(tmp_path):
    folder = xlmr_folder(tmp_path, "classes")
    # as saved by this transformers: the file is what AutoTokenizer runs, and the check passes
    assert _differing_hard_texts(folder) == []
    (line,) = library_check(load_spec(spec_dir(tmp_path / "same", folder, "text-classification")),
                            tmp_path / "export")
    assert line.startswith("scores match transformers") and "and 7 pairs" in line, line

    # the file as transformers 4 saved it: trailing and repeated spaces tokenize otherwise, and
    # `package` stops before the archive reaches the store
    as_transformers_4_saved_it(folder)
    differing = _differing_hard_texts(folder)
    assert "   leading, trailing and   repeated   spaces   " in differing
    with pytest.raises(ReferenceMismatch) as stop:
        package(load_spec(spec_dir(tmp_path / "v4", folder, "text-classification")),
                tmp_path / "store")
    assert not (tmp_path / "store" / "ref.mar").exists()
    message = str(stop.value)
    assert ": tokenizer: " in message and "input_ids" in message, message
    first = differing[0]
    assert repr(first[:40] + ("…" if len(first) > 40 else "")) in message, message
    assert "first difference at position" in message and "save_pretrained" in message


# --- token classification ----------------------------------------------------------------------

def bert_tagger(tmp: Path) -> Path:
    from transformers import BertConfig, BertForTokenClassification

    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        id2label=dict(enumerate(labels)),
                        label2id={v: i for i, v in enumerate(labels)})
    torch.manual_seed(1)
    folder = tmp / "tagger"
    BertForTokenClassification(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt"):
        shutil.copyfile(MINILM / name, folder / name)
    return folder


def test_token_classification_entities_and_offsets_equal_the_pipeline(tmp_path):
    """Through `package` whole: its summary and progress carry the reference's line."""
    folder = bert_tagger(tmp_path)
    spec = load_spec(spec_dir(tmp_path / "s", folder, "token-classification"))
    lines: list[str] = []
    summary = package(spec, tmp_path / "store", progress=lines.append)
    (line,) = summary["reference"]
    assert line.startswith("entities match transformers"), line
    assert f"ref: reference: {line}" in lines and (tmp_path / "store" / "ref.mar").is_file()
    count = int(line.split("): ")[1].split(" entities")[0])
    assert count > 20, line  # random weights: many entities, so offsets are really compared


def test_a_reranker_matches_cross_encoder_predict(tmp_path):
    """A cross-encoder (BertForSequenceClassification, num_labels=1): scores on the seven sample
    pairs (one long on each side, so the pair truncation is compared) and a TEI rerank body's
    order, against sentence-transformers' CrossEncoder.predict."""
    folder = bert_folder(tmp_path, "cross-encoder", ["LABEL_0"])
    spec = load_spec(spec_dir(tmp_path / "s", folder, "text-reranking"))
    (line,) = library_check(spec, tmp_path / "export")
    assert line.startswith("scores match sentence-transformers"), line
    assert "CrossEncoder.predict on 7 (query, passage) pairs" in line, line
    assert "the rerank order too" in line and "tokenization equal on" in line, line


@pytest.mark.parametrize("problem_type, head", [("multi_label_classification", "multi_label"),
                                               ("regression", "regression")])
def test_other_classification_heads_match_the_pipeline(tmp_path, problem_type, head):
    """Multi-label (every label over the threshold, more than top_k) and regression (raw values,
    every output) heads against pipeline("text-classification", top_k=None), texts and pairs."""
    folder = bert_folder(tmp_path, head, LABELS8, seed=1, problem_type=problem_type)
    spec = load_spec(spec_dir(tmp_path / "s", folder, "text-classification"))
    assert spec.text.head == head
    (line,) = library_check(spec, tmp_path / "export")
    assert line.startswith("scores match transformers") and f"({head} head)" in line, line
    assert "and 7 pairs" in line, line


def tiny_sentence_transformer(tmp: Path) -> Path:
    """A 2-layer BERT (random weights) with MiniLM's tokenizer and sentence-transformers modules
    (mean pooling, Normalize)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(2)
    folder = tmp / "tiny-st"
    BertModel(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "modules.json"):
        shutil.copyfile(MINILM / name, folder / name)
    (folder / "1_Pooling").mkdir()
    pooling = json.loads((MINILM / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {**pooling, "word_embedding_dimension": 32}))
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    return folder


def test_a_pooling_the_library_does_not_do_is_named(tmp_path):
    folder = tiny_sentence_transformer(tmp_path)
    spec = load_spec(spec_dir(tmp_path / "s", folder, "feature-extraction",
                              text={"pooling": "cls"}))
    with pytest.raises(ReferenceMismatch) as stop:
        library_check(spec, tmp_path / "export")
    message = str(stop.value)
    assert "tokenization is equal" in message and "stage that differs: pooling" in message
    cosine = float(message.split("cosine ")[1].split()[0])
    assert cosine < 0.9999 and np.isfinite(cosine)
