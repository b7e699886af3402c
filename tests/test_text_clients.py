"""The clients people use against a servetool deployment: the OpenAI Python SDK and TEI-style
HTTP calls, on the clients' front (servetool/engines/torchserve/clients.py) beside a real
TorchServe serving the real all-MiniLM-L6-v2 and a small cross-encoder (random weights, MiniLM's
tokenizer), compared with sentence-transformers (SentenceTransformer, CrossEncoder) on the same
texts; and the tokenizer's guards (huge texts cut before tokenizing, lone surrogates refused in
words)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import numpy as np
import pytest
import requests
import yaml

from handlers.errors import RequestError
from handlers.text import TextEncoder
from servetool.engines.torchserve.process import free_ports
from servetool.operate import lifecycle
from servetool.targets.local import LocalTarget
from tests.conftest import ROOT, package_all, server_options
from tests.test_text import write_text_spec
from tests.test_text_heads import PASSAGES, QUERY, bert_folder

MINILM = ROOT / "models" / "minilm"
TEXTS = ["A man is eating food.", "Les enfants jouent dans le parc. 😀",
         "  padded   with  spaces\tand tabs  ", "Ünïcödé ﬁ ligatures and naïve café"]
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def folder():
    found = MINILM / "model"
    if not (found / "tokenizer.json").is_file():
        pytest.fail("models/minilm/model is missing: run models/minilm/make_model.sh")
    return found


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    """A one-score BertForSequenceClassification folder (a cross-encoder, random weights)."""
    return bert_folder(tmp_path_factory.mktemp("cross"), "cross-encoder", ["LABEL_0"])


@pytest.fixture(scope="module")
def clients(tmp_path_factory, cross_encoder):
    """MiniLM and a reranker (the cross-encoder, TorchScript: traced in seconds) packaged and
    deployed with the clients' front: (its URL, the inference key)."""
    store, work = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("spec")
    spec = yaml.safe_load((MINILM / "servetool.yaml").read_text())
    spec["source"]["transformers"] = str(folder())
    (work / "minilm").mkdir()
    # a short gate (8 of the example's sentences) and plain ONNX: the package is not under test
    samples = (MINILM / "samples.txt").read_text().splitlines()[:8]
    (work / "minilm" / "samples.txt").write_text("\n".join(samples) + "\n")
    spec["text"]["samples"] = "samples.txt"
    spec |= {"workers": {"min": 1, "max": 1}, "format": "onnx",
             "max_request_bytes": 8_000_000}  # the 6 MB text's request
    (work / "minilm" / "servetool.yaml").write_text(yaml.safe_dump(spec))
    package_all([work / "minilm", write_text_spec(work / "rerank", cross_encoder, "rerank",
                                                  "text-reranking", format="torchscript")],
                store)
    opts = replace(server_options(tmp_path_factory.mktemp("run"), store),
                   clients_port=free_ports(("clients",))["clients"])
    target = LocalTarget(opts)
    lifecycle.deploy(target, [])
    state = target.running()
    url = f"http://127.0.0.1:{state.clients_port}"
    key = target.client().token("inference")
    deadline = time.monotonic() + 30  # the front starts beside TorchServe; wait for its port
    while time.monotonic() < deadline:
        try:
            requests.get(f"{url}/v1/models", timeout=2)
            break
        except requests.ConnectionError:
            time.sleep(0.3)
    yield url, key
    target.down()


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder()), device="cpu")


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_openai_sdk_with_its_defaults_and_with_dimensions(clients, reference):
    from openai import OpenAI
    from tokenizers import Tokenizer

    url, key = clients
    client = OpenAI(base_url=f"{url}/v1", api_key=key)
    expected = reference.encode(TEXTS)
    answer = client.embeddings.create(model="minilm", input=TEXTS)  # base64, the SDK's default
    got = np.array([d.embedding for d in answer.data])
    assert got.shape == (4, 384) and cosines(got, expected).min() >= 0.9999
    tokenizer = Tokenizer.from_file(str(folder() / "tokenizer.json"))
    tokenizer.no_padding()  # the saved file pads to 128; the worker pads per batch
    assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(t).ids) for t in TEXTS)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens
    short = client.embeddings.create(model="minilm", input=TEXTS, dimensions=128,
                                     encoding_format="float")
    cut = expected[:, :128] / np.linalg.norm(expected[:, :128], axis=1, keepdims=True)
    vectors = np.array([d.embedding for d in short.data])
    assert vectors.shape == (4, 128) and cosines(vectors, cut).min() >= 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [m.id for m in client.models.list()] == ["minilm", "rerank"]


def test_openai_errors_in_openai_shape(clients):
    import openai

    url, key = clients
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="dimensions 1000 is more than this model's "
                                                     "384"):
        client.embeddings.create(model="minilm", input="hello", dimensions=1000)
    with pytest.raises(openai.NotFoundError, match="no model named 'gpt'.*minilm"):
        client.embeddings.create(model="gpt", input="hello")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="minilm", input="hello")
    reply = requests.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                          data=b'{"model": "minilm", "input": "ab\\ud800cd"}')
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "lone surrogate U+D800 at character 2" in error["message"]


def test_tei_embed_and_errors_in_tei_shape(clients, reference):
    url, key = clients
    auth = {"Authorization": f"Bearer {key}"}
    reply = requests.post(f"{url}/embed", headers=auth, json={"inputs": TEXTS, "truncate": True})
    assert reply.status_code == 200, reply.text
    assert cosines(reply.json(), reference.encode(TEXTS)).min() >= 0.9999
    single = requests.post(f"{url}/embed", headers=auth, json={"inputs": TEXTS[0]}).json()
    assert np.asarray(single).shape == (1, 384)
    rerank = requests.post(f"{url}/rerank?model=minilm", headers=auth,
                           json={"query": "q", "texts": ["a"]})
    assert rerank.status_code == 400
    assert rerank.json()["error_type"] == "Validation"
    assert "'minilm' is a feature-extraction model" in rerank.json()["error"]
    assert "fitting: rerank" in rerank.json()["error"]
    odd = requests.post(f"{url}/embed", headers=auth, json={"inputs": "x", "normalize": False})
    assert odd.status_code == 400 and "text.normalize" in odd.json()["error"]
    assert requests.post(f"{url}/embed", json={"inputs": "x"}).status_code == 401


def test_tei_rerank_and_predict_over_http_equal_cross_encoder(clients, cross_encoder):
    """TEI's /rerank (no model named: the only reranker deployed) and /predict, answered by the
    reranker as sentence-transformers' CrossEncoder.predict scores the pairs (sigmoid)."""
    from sentence_transformers import CrossEncoder

    url, key = clients
    auth = {"Authorization": f"Bearer {key}"}
    expected = CrossEncoder(str(cross_encoder), device="cpu").predict(
        [(QUERY, p) for p in PASSAGES])
    assert np.diff(np.sort(expected)).min() > 1e-3  # an order to get right, not ties
    reply = requests.post(f"{url}/rerank", headers=auth,
                          json={"query": QUERY, "texts": PASSAGES, "return_text": True})
    assert reply.status_code == 200, reply.text
    ranked = reply.json()
    assert [r["index"] for r in ranked] == list(np.argsort(-expected, kind="stable"))
    for r in ranked:
        assert set(r) == {"index", "score", "text"} and r["text"] == PASSAGES[r["index"]]
        assert abs(r["score"] - expected[r["index"]]) < 1e-4
    # TEI reads ["q", "p"] as one pair and answers it alone; a list of pairs, one answer each
    one = requests.post(f"{url}/predict", headers=auth, json={"inputs": [QUERY, PASSAGES[0]]})
    assert one.status_code == 200, one.text
    assert set(one.json()) == {"score"} and abs(one.json()["score"] - expected[0]) < 1e-4
    several = requests.post(f"{url}/predict", headers=auth,
                            json={"inputs": [[QUERY, p] for p in PASSAGES[:3]]})
    assert np.allclose([p["score"] for p in several.json()], expected[:3], atol=1e-4)
    wrong = requests.post(f"{url}/rerank", headers=auth, json={"query": QUERY, "texts": []})
    assert wrong.status_code == 400 and wrong.json()["error_type"] == "Validation"
    assert "empty list" in wrong.json()["error"]


def test_a_huge_text_is_cut_before_tokenizing(clients, reference):
    """6 MB of text: answered in well under the ~10-25 s its whole tokenization takes here,
    truncated, with the vector of its first 256 tokens (sentence-transformers, same cut)."""
    url, key = clients
    words = (MINILM / "samples.txt").read_text().split()
    random.seed(1)
    text = " ".join(random.choice(words) for _ in range(900_000))[:6_000_000]
    started = time.perf_counter()
    reply = requests.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "minilm", "input": text, "encoding_format": "float"})
    took = time.perf_counter() - started
    assert reply.status_code == 200, reply.text[:300]
    body = reply.json()
    assert body["truncated"] == [True] and body["usage"]["prompt_tokens"] == 256
    expected = reference.encode([text[:20_000]])  # sentence-transformers cuts it at 256 too
    assert cosines([body["data"][0]["embedding"]], expected)[0] >= 0.9999
    assert took < 8, f"{took:.1f} s for a 6 MB text"


def test_the_cut_tokenization_equals_the_whole_one():
    encoder = TextEncoder(str(folder() / "tokenizer.json"), INPUTS, 64)
    random.seed(2)
    pieces = ["word", "naïve", "ﬁne", "😀😀", "中文字符", "e\u0301", "x" * 130, "a.b,c"]
    for _ in range(150):
        text = "".join(random.choice(pieces) + random.choice([" ", "  ", "\n", "\t ", ""])
                       for _ in range(random.randint(10, 900)))
        if not text.strip():
            continue
        got = encoder.encode([text])[0]
        whole = encoder.tokenizer.encode(text)
        assert got.feeds["input_ids"].tolist() == whole.ids
        assert got.offsets == list(whole.offsets) and got.truncated == bool(whole.overflowing)
    refusing = TextEncoder(str(folder() / "tokenizer.json"), INPUTS, 64, truncate=False)
    with pytest.raises(RequestError, match="over 64 tokens long") as raised:
        refusing.encode(["many words here " * 400_000])
    assert raised.value.status == 413
    with pytest.raises(RequestError, match="text 1 holds a lone surrogate U\\+DC00 at character 3"):
        encoder.encode(["fine", "abc\udc00"])


def test_the_clients_front_shapes_without_a_server():
    """What needs no server: the model chosen per path, TEI bodies, error shapes."""
    from servetool.engines.torchserve import clients as front

    assert front.fits(front.RERANK, "text-classification", "score")
    assert not front.fits(front.RERANK, "text-classification", "classes")
    assert front.tei_body(front.CLASSIFY, {"inputs": ["q", "p"]}) == ({"inputs": [["q", "p"]]},
                                                                      True)
    assert front.error_body("tei", 503, "busy") == {"error": "busy", "error_type": "Overloaded"}
    assert json.dumps(front.error_body("openai", 404, "gone", "model_not_found")["error"]) == \
        json.dumps({"message": "gone", "type": "invalid_request_error", "code": "model_not_found",
                    "param": None})
