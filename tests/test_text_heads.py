"""Every head a Hugging Face text folder declares, text pairs and reranking, each against the
library users would otherwise run: sentence-transformers' CrossEncoder for a reranker, the
model's own logits on `tokenizer(q, p)` for pairs, transformers' token-classification pipeline
for every aggregation strategy.

The models are small BERTs built from config with random weights and MiniLM's WordPiece
tokenizer, packaged as a user would (package: export, gate, archive, pre-flight), and served by
the unpacked archive's own handler in-process (servetool.convert.reference.served.ServedPath).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from servetool.convert.reference.served import ServedPath
from servetool.model.spec import SpecError, load_spec
from tests.test_text import minilm_folder, write_text_spec

QUERY = "how do plants make food"
PASSAGES = [
    "Photosynthesis turns light, water and carbon dioxide into sugar in the leaves.",
    "The stock market closed higher on Friday.",
    "Plants use chlorophyll to capture the energy of sunlight.",
    "Bonjour, je m'appelle Marie et j'habite à Paris.",
    "Roots take up water and minerals from the soil.",
]
NER_TEXTS = ["Marie Curie moved from Warsaw to Paris in 1891.",
             "Hugging Face Inc. opened an office in Brooklyn, New York City",
             "naïve façade: Zürich's Schwarzwälder-Kirschtorte costs 12.50 CHF"]
LABELS8 = [f"topic_{i}" for i in range(8)]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "ORG"]


def bert_folder(directory: Path, name: str, labels: list[str], token: bool = False,
                problem_type: str | None = None, seed: int = 0) -> Path:
    """A 2-layer BERT classifier with random weights (spread wide enough that its answers
    differ from text to text) and MiniLM's tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        initializer_range=0.2, id2label=dict(enumerate(labels)),
                        label2id={v: i for i, v in enumerate(labels)},
                        **({"problem_type": problem_type} if problem_type else {}))
    torch.manual_seed(seed)
    model = (BertForTokenClassification if token else BertForSequenceClassification)(config)
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)
        if problem_type == "multi_label_classification":  # 6 labels likely, 2 unlikely
            model.classifier.bias.copy_(torch.tensor([4.0] * 6 + [-4.0] * 2))
    folder = directory / name
    model.eval().save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(minilm_folder() / file, folder / file)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("heads")
    return {"cross": bert_folder(work, "cross-encoder", ["LABEL_0"]),
            "multi": bert_folder(work, "multi", LABELS8, seed=1,
                                 problem_type="multi_label_classification"),
            "nli": bert_folder(work, "nli", ["entailment", "neutral", "contradiction"], seed=2),
            "ner": bert_folder(work, "ner", NER_LABELS, token=True, seed=3)}


@pytest.fixture(scope="module")
def archives(tmp_path_factory, folders) -> dict[str, tuple[Path, dict]]:
    """The archives, built as `package` builds them (spec, export, gate, archive) but in
    TorchScript, whose export takes seconds where ONNX's takes half a minute on a busy machine:
    name -> (the unpacked archive, its model-config). The cross-encoder's one export serves two
    specs (text-reranking, and text-classification, its score head)."""
    from servetool.convert.pipeline import convert
    from servetool.engines.torchserve import archive

    work = tmp_path_factory.mktemp("archives")
    wanted = {"rerank": ("cross", "text-reranking"), "score": ("cross", "text-classification"),
              "multi": ("multi", "text-classification"), "ner": ("ner", "token-classification")}
    exported: dict[str, object] = {}
    unpacked = {}
    for name, (model, task) in wanted.items():
        spec = load_spec(write_text_spec(work / name, folders[model], name, task,
                                         format="torchscript"))
        if model not in exported:
            exported[model], report = convert(spec, "torchscript", work / f"export-{model}")
            assert report.ok, report.problems
            if model == "cross":  # one score per pair: no class to agree on, values compared
                assert report.outputs[0].top1_agreement is None
        artifact = exported[model]
        mar = archive.build_archive(spec, artifact, work / "store", check=False)
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(work / "unpacked" / name)
        unpacked[name] = (work / "unpacked" / name, archive.model_config(spec, artifact))
    return unpacked


def serve(archives, name: str, **text) -> ServedPath:
    folder, config = archives[name]
    config = {**config, "handler": {**config["handler"],
                                    "text": {**config["handler"]["text"], **text}}}
    return ServedPath(folder, config)


def ask(served: ServedPath, body) -> object:
    return served.answer_one(json.dumps(body).encode())


def test_reranking_equals_cross_encoder(archives, folders):
    import torch
    from sentence_transformers import CrossEncoder

    cross = CrossEncoder(str(folders["cross"]), device="cpu")
    pairs = [(QUERY, p) for p in PASSAGES]
    expected = cross.predict(pairs)  # sigmoid, num_labels=1's default
    logits = cross.predict(pairs, activation_fn=torch.nn.Identity())
    assert np.diff(np.sort(expected)).min() > 1e-3  # the order is meaningful, not ties
    served = serve(archives, "rerank")
    ranking = ask(served, {"query": QUERY, "texts": PASSAGES, "return_text": False,
                           "raw_scores": False, "truncate": True})
    assert [r["index"] for r in ranking] == list(np.argsort(-expected, kind="stable"))
    for r in ranking:
        assert set(r) == {"index", "score"}
        assert abs(r["score"] - expected[r["index"]]) < 1e-4
    raw = ask(served, {"query": QUERY, "texts": PASSAGES, "raw_scores": True,
                       "return_text": True})
    assert [r["index"] for r in raw] == [r["index"] for r in ranking]
    for r in raw:
        assert abs(r["score"] - logits[r["index"]]) < 1e-4
        assert r["text"] == PASSAGES[r["index"]]
    # the same pairs under "inputs": one score each, in request order, saying how it was made
    listed = ask(served, {"inputs": [list(p) for p in pairs]})
    assert listed["activation"] == "sigmoid" and listed["truncation"] == "longest_first"
    assert np.allclose([p["score"] for p in listed["predictions"]], expected, atol=1e-4)
    # a long passage is cut as CrossEncoder cuts it (longest_first), and the answer says so
    long_pair = [QUERY, "water " * 300]
    (cut,) = cross.predict([tuple(long_pair)])
    answer = ask(served, {"inputs": [long_pair]})
    assert answer["truncated"] == [True] and answer["tokens"] == [128]
    assert abs(answer["predictions"][0]["score"] - cut) < 1e-4


def test_rerank_request_errors_name_the_problem(archives):
    served = serve(archives, "rerank")
    replies, statuses, _ = served.answer([
        json.dumps({"query": QUERY, "texts": []}).encode(),
        json.dumps({"query": QUERY, "texts": ["a"], "raw_score": True}).encode(),
        json.dumps({"query": QUERY, "texts": ["water " * 300], "truncate": False}).encode(),
        json.dumps({"inputs": [["only one"]]}).encode(),
    ])
    assert statuses == [400, 400, 413, 400]
    assert "empty list" in replies[0]["error"] and "'raw_score'" in replies[1]["error"]
    assert "at most 128" in replies[2]["error"]
    assert "a text pair is a list of two texts" in replies[3]["error"]
    multi = serve(archives, "multi")
    (reply,), (status,), _ = multi.answer([json.dumps({"query": "q", "texts": ["a"]}).encode()])
    assert status == 400 and "text-reranking" in reply["error"]


def test_one_label_classifier_answers_a_score(archives, folders):
    texts = ["I love it", "the weather in Paris"]
    expected = 1 / (1 + np.exp(-_logits(folders["cross"], texts)[:, 0]))
    body = ask(serve(archives, "score"), {"inputs": texts})
    assert body["activation"] == "sigmoid" and "truncation" not in body
    scores = [p["score"] for p in body["predictions"]]
    assert np.allclose(scores, expected, atol=1e-4) and scores[0] != scores[1]  # not 1.0
    raw = ask(serve(archives, "score", score="raw"), {"inputs": texts})
    assert raw["activation"] == "raw"
    assert np.allclose(1 / (1 + np.exp(-np.array([p["score"] for p in raw["predictions"]]))),
                       scores, atol=1e-6)


def _logits(folder: Path, *args) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(**tokenizer(*args, padding=True, return_tensors="pt")).logits.numpy()


def test_multi_label_returns_every_label_over_the_threshold(archives, folders):
    texts = ["A text about many topics at once.", "Another one."]
    probabilities = 1 / (1 + np.exp(-_logits(folders["multi"], texts)))
    body = ask(serve(archives, "multi"), {"inputs": texts})
    assert body["activation"] == "sigmoid" and body["threshold"] == 0.5
    for row, predictions in zip(probabilities, body["predictions"], strict=True):
        over = {LABELS8[i] for i in np.flatnonzero(row >= 0.5)}
        assert len(over) > 5  # more than top_k (5): none may be dropped
        assert {p["label"] for p in predictions} == over
        assert all(abs(p["score"] - row[LABELS8.index(p["label"])]) < 1e-4 for p in predictions)
    strict = ask(serve(archives, "multi", threshold=0.99), {"inputs": texts})
    for row, predictions in zip(probabilities, strict["predictions"], strict=True):
        assert {p["label"] for p in predictions} == {LABELS8[i] for i in np.flatnonzero(row >= 0.99)}


def test_pairs_carry_the_second_segment(archives, folders):
    """NLI-style pairs (a multi-label head here): the served scores are the model's own on
    transformers' `tokenizer(premise, hypothesis)`, token_type_ids 1 on the second segment."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = folders["multi"]
    premises = ["A man is playing a guitar on stage.", "Two dogs run through a field."]
    hypotheses = ["Someone is making music.", "The animals are asleep."]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    feeds = tokenizer(premises, hypotheses, padding=True, return_tensors="pt")
    assert (feeds["token_type_ids"] == 1).any()
    with torch.no_grad():
        expected = torch.sigmoid(model(**feeds).logits).numpy()
        one_segment = torch.sigmoid(model(**{**feeds, "token_type_ids": torch.zeros_like(
            feeds["token_type_ids"])}).logits).numpy()
    assert np.abs(expected - one_segment).max() > 1e-3  # the second segment changes the answer
    served = serve(archives, "multi", threshold=1e-9)  # every label: every score compared
    for body in ({"inputs": [[p, h] for p, h in zip(premises, hypotheses, strict=True)]},
                 {"inputs": [{"text": p, "text_pair": h}
                             for p, h in zip(premises, hypotheses, strict=True)]}):
        answer = ask(served, body)
        assert answer["truncation"] == "longest_first"
        for row, predictions in zip(expected, answer["predictions"], strict=True):
            assert len(predictions) == len(LABELS8)
            assert all(abs(p["score"] - row[LABELS8.index(p["label"])]) < 1e-4
                       for p in predictions)
    single = ask(served, {"inputs": {"text": premises[0], "text_pair": hypotheses[0]}})
    assert single["predictions"] == ask(served, {"inputs": [[premises[0], hypotheses[0]]]})[
        "predictions"]
    # a list of two texts at the top level of "inputs" stays two texts, not a pair
    two = ask(served, {"inputs": [premises[0], hypotheses[0]]})
    assert len(two["predictions"]) == 2 and "truncation" not in two


def test_aggregation_strategies_equal_the_pipeline(archives, folders):
    from transformers import pipeline

    folder = folders["ner"]
    answers = {}
    for strategy in ("first", "simple", "average", "max"):
        reference = pipeline("token-classification", model=str(folder), device="cpu",
                             aggregation_strategy=strategy)
        served = serve(archives, "ner", aggregation=strategy)
        body = ask(served, {"inputs": NER_TEXTS})
        answers[strategy] = body["entities"]
        for text, ours, theirs in zip(NER_TEXTS, body["entities"], reference(NER_TEXTS),
                                      strict=True):
            assert [(e["entity_group"], e["start"], e["end"]) for e in ours] == \
                [(e["entity_group"], e["start"], e["end"]) for e in theirs], (strategy, text)
            assert np.allclose([e["score"] for e in ours], [float(e["score"]) for e in theirs],
                               atol=1e-5)
            assert all(e["word"] == text[e["start"]:e["end"]] for e in ours)
    # the strategies differ on these texts, so each comparison above says something
    assert len({json.dumps(a) for a in answers.values()}) == 4


def test_heads_and_tasks_that_do_not_fit_are_refused(folders, tmp_path):
    for task in ("tensor", "feature-extraction"):
        with pytest.raises(SpecError, match=r"drops the trained head.*use task: "
                                            r"text-classification.*text.hidden_states"):
            load_spec(write_text_spec(tmp_path / task, folders["nli"], "x", task))
    with pytest.raises(SpecError, match=r"use task: token-classification"):
        load_spec(write_text_spec(tmp_path / "ner", folders["ner"], "x", "tensor"))
    hidden = load_spec(write_text_spec(tmp_path / "hidden", folders["nli"], "x", "tensor",
                                       text={"hidden_states": True}))
    assert hidden.task == "tensor"
    with pytest.raises(SpecError, match=r"head has 3 outputs.*use task: text-classification"):
        load_spec(write_text_spec(tmp_path / "r", folders["nli"], "x", "text-reranking"))
    with pytest.raises(SpecError, match=r"text.threshold.*multi-label"):
        load_spec(write_text_spec(tmp_path / "t", folders["nli"], "x", "text-classification",
                                  text={"threshold": 0.3}))
    with pytest.raises(SpecError, match=r"text.aggregation.*must be one of"):
        load_spec(write_text_spec(tmp_path / "a", folders["ner"], "x", "token-classification",
                                  text={"aggregation": "none"}))
    spec = load_spec(write_text_spec(tmp_path / "s", folders["cross"], "x", "text-reranking",
                                     text={"score": "raw", "pair_truncation": "only_second"}))
    assert (spec.text.head, spec.text.score, spec.text.pair_truncation) == (
        "score", "raw", "only_second")


def test_a_cross_encoder_activation_servetool_does_not_apply_is_refused(folders, tmp_path):
    """A CrossEncoder saved with Tanh would get sigmoid scores: the spec must choose."""
    import json

    folder = tmp_path / "tanh"
    shutil.copytree(folders["cross"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": "torch.nn.modules.activation.Tanh"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"text.score.*activation Tanh.*score: sigmoid or score: raw"):
        load_spec(write_text_spec(tmp_path / "t", folder, "x", "text-reranking"))
    chosen = load_spec(write_text_spec(tmp_path / "c", folder, "x", "text-reranking",
                                       text={"score": "raw"}))
    assert chosen.text.score == "raw"
