"""Reference parity for text models from a Hugging Face folder: transformers' and
sentence-transformers' own inference on raw texts against servetool's served answer.

Stages, in order; the first that differs stops packaging, naming the text and by how much:
- tokenizer: the worker's tokenizer (handlers.text.TextEncoder on the archive's tokenizer.json, the
  handler's own instance) against `transformers.AutoTokenizer.from_pretrained(folder)` with the
  same max_length and truncation, per text (and pair): input_ids, attention_mask, token_type_ids.
  transformers is the reference: it is what the user's training and evaluation code ran. It does
  not always run tokenizer.json as saved (transformers 5 rebuilds a SentencePiece tokenizer such
  as XLM-R's normalizer and pre-tokenizer from its class), so a folder saved elsewhere can
  tokenize differently in the worker; the message says how to re-save it.
- runtime: the served artifact's raw outputs on the worker's tokens against the library's model in
  PyTorch on the same tokens (logits; for embeddings the served vector against the library's,
  where `pooling` names a pooling the library's modules do not do).
- head / postprocessing-offsets: the served answer against the library's answer: embeddings from
  `SentenceTransformer` (a sentence-transformers folder: modules.json) or AutoModel + the spec's
  pooling, by cosine; text-classification from `pipeline("text-classification", top_k=None)`
  (softmax, or sigmoid for multi-label and one-output heads, as the pipeline reads config.json);
  text-reranking from `CrossEncoder.predict` on (query, passage) pairs; token-classification from
  `pipeline("token-classification", aggregation_strategy=text.aggregation)`: entity groups,
  scores, character offsets (the pipeline's "word" is its decoded tokens, lower-cased by an
  uncased tokenizer: servetool's is the text between the offsets, which is what is compared).

The texts: the spec's sample sentences (or servetool's varied set) and hard ones: several
scripts, emoji and ZWJ sequences, leading/trailing/repeated spaces, tabs and newlines, NFKC-
sensitive characters, decomposed accents, a zero-width-only text and a text past max_length (so
truncation is compared).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from servetool.convert.reference import LibraryMissing, ReferenceMismatch
from servetool.model.spec import TEXT_TASKS, ModelSpec

# fp32 formats differ from the library by float rounding only
FP32_COSINE = 0.9999
FP32_SCORE_ATOL = 1e-3
HARD_TEXTS = (
    "東京は日本の首都です。Москва — столица России. नमस्ते दुनिया। مرحبا بالعالم",
    "Emoji 😍🔥👍🏽, a family 👨\u200d👩\u200d👧\u200d👦, a flag 🇫🇷 and 🧑🏾\u200d💻 at work",
    "   leading, trailing and   repeated   spaces   ",
    "tabs\tand\nnewlines\r\nmixed \t in one text\n",
    "NFKC: the ﬁnal ﬂoor ① ２０２６ ＡＢＣ ｶﾀｶﾅ ™ ½ Ⅻ",
    "decomposed: cafe\u0301 re\u0301sume\u0301 nai\u0308ve Ågstro\u0308m",
    "Marie Curie worked in Paris with Pierre Curie; Ada Lovelace lived in London.",
    "\u200b\u200d",  # zero-width only: nothing but invisible characters
)
EMPTYISH = HARD_TEXTS[-1]
FIX = ("if transformers is what the model was trained and evaluated with, re-save the tokenizer so "
       "tokenizer.json holds what it runs: python -c \"from transformers import AutoTokenizer as "
       "T; T.from_pretrained('{folder}').save_pretrained('{folder}')\", then package again")


def applies(spec: ModelSpec) -> bool:
    return spec.task in TEXT_TASKS and spec.source.kind == "transformers" and spec.text is not None


def _preview(text: str, width: int = 40) -> str:
    return repr(text[:width] + ("…" if len(text) > width else ""))


def _name(texts: list[str], i: int, pair: str | None = None) -> str:
    return f"text #{i} {_preview(texts[i])}" + (f" with {_preview(pair, 24)}" if pair else "")


def overlong_text(max_length: int) -> str:
    """Varied sentences, repeated past max_length tokens (at least one token per 8 characters)."""
    unit = " ".join(t for t in HARD_TEXTS[:-1]) + " "
    return (unit * (8 * max_length // len(unit) + 1)).strip()


def sample_texts(spec: ModelSpec) -> list[str]:
    from servetool.model.samples import sample_texts as servetool_samples

    base = list(dict.fromkeys(servetool_samples(spec, 64)))  # the spec's, else the varied set
    return base[:24] + list(HARD_TEXTS) + [overlong_text(spec.text.max_length)]


def sample_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """(query, passage) pairs: short with short, hard with hard, and a passage (and a query) past
    max_length, so the pair truncation is compared."""
    short, hard, long = texts[:4], list(HARD_TEXTS[:6]), texts[-1]
    return ([(short[0], short[1]), (short[2], short[3]), (hard[0], hard[1]), (hard[2], hard[3]),
             (hard[4], hard[5]), (short[0], long), (long, short[1])])


class Library:
    """transformers' tokenizer for the folder, truncating as the spec does."""

    def __init__(self, spec: ModelSpec) -> None:
        try:
            import transformers
            from transformers import AutoTokenizer
        except Exception as exc:
            raise LibraryMissing(f"transformers is not importable here ({type(exc).__name__}: "
                                 f"{exc})") from None
        self.transformers = transformers
        self.name = f"transformers {transformers.__version__}"
        self.spec = spec
        self.folder = spec.source.path
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        # the pipelines truncate at model_max_length: the spec's limit, as the worker does
        self.tokenizer.model_max_length = spec.text.max_length

    def encode(self, text: str, pair: str | None = None) -> dict[str, list[int]]:
        truncation = self.spec.text.pair_truncation if pair is not None else True
        return dict(self.tokenizer(text, pair, truncation=truncation,
                                   max_length=self.spec.text.max_length))


def check(spec: ModelSpec, served) -> str:
    library = Library(spec)
    # the zero-width-only text may be refused as empty; a spec that refuses over-long texts
    # (text.truncate: false) is compared on the texts it takes
    texts = [t for t in sample_texts(spec)
             if (t != EMPTYISH and spec.text.truncate) or _accepted(served, t)]
    pairs = sample_pairs(texts) if spec.task in ("text-classification", "text-reranking") else []
    if not spec.text.truncate:
        pairs = [p for p in pairs if _accepted(served, *p)]
    compare_tokens(spec, served, library, texts, pairs)
    tokens = f"tokenization equal on {len(texts)} texts" + (f" and {len(pairs)} pairs"
                                                            if pairs else "")
    if spec.task == "feature-extraction":
        answers = check_embeddings(spec, served, library, texts)
    elif spec.task == "token-classification":
        answers = check_entities(spec, served, library, texts)
    elif spec.task == "text-reranking":
        answers = check_reranking(spec, served, library, pairs)
    else:
        answers = check_classification(spec, served, library, texts, pairs)
    return f"{answers}; {tokens} (several scripts, emoji, whitespace, NFKC, decomposed accents, " \
           f"past max_length {spec.text.max_length})"


def _accepted(served, text: str, pair: str | None = None) -> bool:
    """Whether servetool answers this text or pair (the zero-width-only text may be refused as
    empty, an over-long one under text.truncate: false)."""
    inputs = text if pair is None else {"text": text, "text_pair": pair}
    _, statuses, _ = served.answer([json.dumps({"inputs": inputs}).encode()])
    return statuses[0] == 200


# --- tokenizer ---------------------------------------------------------------------------------

def compare_tokens(spec: ModelSpec, served, library: Library, texts: list[str],
                   pairs: list[tuple[str, str]]) -> None:
    encoder = served.handler.task.encoder
    cases = [(t, None) for t in texts] + list(pairs)
    for i, (text, pair) in enumerate(cases):
        # truncated as transformers truncates, whatever the spec's policy for requests
        mine = encoder.encode([text], None if pair is None else [pair], truncate=True)[0]
        theirs = library.encode(text, pair)
        for column in encoder.input_names:
            if column not in theirs:  # transformers leaves it to the model's default (zeros)
                continue
            ours, want = mine.feeds[column].tolist(), list(theirs[column])
            if ours != want:
                where = _name([c[0] for c in cases], i, pair)
                raise ReferenceMismatch(_token_message(spec, library, where, column, ours, want,
                                                       mine.pieces))


def _token_message(spec: ModelSpec, library: Library, where: str, column: str, ours: list[int],
                   want: list[int], pieces: list[str]) -> str:
    k = next((j for j, (a, b) in enumerate(zip(ours, want, strict=False)) if a != b),
             min(len(ours), len(want)))
    lo = max(0, k - 3)
    window = lambda ids: (("... " if lo else "") + str(ids[lo:k + 4])[1:-1]  # noqa: E731
                          + (" ..." if len(ids) > k + 4 else ""))
    detail = ""
    if column == "input_ids":
        got = pieces[k] if k < len(pieces) else "(end)"
        expected = (library.tokenizer.convert_ids_to_tokens(want[k]) if k < len(want)
                    else "(end)")
        detail = f": worker {got!r}, transformers {expected!r}"
    fix = FIX.format(folder=library.folder)
    return (f"{spec.name}: tokenizer: the worker's tokenizer ({spec.text.tokenizer.name} as "
            f"saved) and {library.name}'s AutoTokenizer for {library.folder} give different "
            f"{column} on {where}: worker [{window(ours)}] ({len(ours)} tokens) vs transformers "
            f"[{window(want)}] ({len(want)} tokens), first difference at position {k}{detail}; "
            f"{fix}")


# --- embeddings --------------------------------------------------------------------------------

def cosine_bound(spec: ModelSpec) -> float:
    """0.9999 at full precision; below it, the format's gate bound (validate.limits_for: 0.98 for
    fp16 and int8) or the spec's tolerance.min_cosine where that is lower."""
    from servetool.convert.gate import limits_for
    from servetool.model.formats import get_format

    bound = limits_for(spec.format, spec.tolerance, task="feature-extraction").min_cosine
    if get_format(spec.format).precision == "fp32":
        return min(FP32_COSINE, bound) if spec.tolerance.min_cosine is not None else FP32_COSINE
    return float(bound)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _pool(hidden: np.ndarray, mask: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    if pooling == "cls":
        pooled = hidden[0]
    else:
        pooled = (hidden * mask[:, None]).sum(0) / max(mask.sum(), 1e-9)
    return pooled / max(np.linalg.norm(pooled), 1e-12) if normalize else pooled


class Embedder:
    """SentenceTransformer for a sentence-transformers folder, else AutoModel + the spec's pooling;
    `token_embeddings` gives the hidden states the pooling starts from."""

    def __init__(self, spec: ModelSpec, library: Library) -> None:
        self.spec = spec
        self.st = None
        if (spec.source.path / "modules.json").is_file():
            try:
                import sentence_transformers
                from sentence_transformers import SentenceTransformer
            except Exception as exc:
                raise LibraryMissing(f"sentence-transformers is not importable here "
                                     f"({type(exc).__name__}: {exc})") from None
            self.st = SentenceTransformer(str(spec.source.path), device="cpu",
                                          local_files_only=True)
            self.st.max_seq_length = spec.text.max_length
            self.name = f"sentence-transformers {sentence_transformers.__version__}"
        else:
            self.model = library.transformers.AutoModel.from_pretrained(
                str(spec.source.path), local_files_only=True).eval()
            self.name = (f"{library.name} AutoModel + {spec.text.pooling} pooling"
                         + (" + L2 normalisation" if spec.text.normalize else ""))
        self.library = library

    def embed(self, texts: list[str]) -> np.ndarray:
        if self.st is not None:
            return np.asarray(self.st.encode(texts, convert_to_numpy=True, batch_size=8))
        return np.stack([_pool(h, m, self.spec.text.pooling, self.spec.text.normalize)
                         for h, m in self.hidden(texts)])

    def hidden(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(last hidden state [tokens, dim], attention mask) per text, from the library."""
        import torch

        if self.st is not None:
            out = self.st.encode(texts, output_value="token_embeddings", convert_to_numpy=False)
            return [(np.asarray(h.float().cpu().numpy(), np.float64), np.ones(len(h)))
                    for h in out]
        found = []
        for text in texts:
            feeds = self.library.tokenizer(text, truncation=True, return_tensors="pt",
                                           max_length=self.spec.text.max_length)
            with torch.inference_mode():
                h = self.model(**feeds).last_hidden_state[0].double().numpy()
            found.append((h, feeds["attention_mask"][0].double().numpy()))
        return found


def check_embeddings(spec: ModelSpec, served, library: Library, texts: list[str]) -> str:
    embedder = Embedder(spec, library)
    want = embedder.embed(texts)
    bound = cosine_bound(spec)
    cosines = []
    for i, text in enumerate(texts):
        got = served.answer_one(json.dumps({"inputs": text}).encode())["embeddings"][0]
        cosines.append(_cosine(got, want[i]))
        if cosines[-1] < bound:
            stage = _embedding_stage(spec, embedder, text, np.asarray(got), want[i], bound)
            raise ReferenceMismatch(
                f"{spec.name}: servetool's embedding differs from {embedder.name}'s on "
                f"{_name(texts, i)}: cosine {cosines[-1]:.6f} (bound {bound:g}); tokenization is "
                f"equal; the stage that differs: {stage}")
    return (f"embeddings match {embedder.name}: cosine >= {min(cosines):.6f} (bound {bound:g}) "
            f"on {len(texts)} texts")


def _embedding_stage(spec: ModelSpec, embedder: Embedder, text: str, got: np.ndarray,
                     want: np.ndarray, bound: float) -> str:
    """pooling: servetool's vector is the library's hidden states pooled as the spec says (the
    library pools otherwise); else runtime: the served model's hidden states differ."""
    hidden, mask = embedder.hidden([text])[0]
    for pooling in ("mean", "cls"):
        for normalize in (True, False):
            if _cosine(got, _pool(hidden, mask, pooling, normalize)) >= bound and \
                    (pooling, normalize) != (spec.text.pooling, not spec.text.normalize):
                return (f"pooling: servetool pools {spec.text.pooling}"
                        f"{' + normalise' if spec.text.normalize else ''} (text.pooling, "
                        f"text.normalize), the library's modules pool otherwise: give the spec "
                        f"the folder's pooling (modules.json) or drop the keys")
    return ("runtime: the served model's vector differs from the library's hidden states pooled "
            f"either way (cosine to the library's {_cosine(got, want):.6f})")


# --- text classification and reranking ---------------------------------------------------------

def score_tolerance(spec: ModelSpec) -> float:
    """1e-3 for fp32 formats; the format's own atol where looser (fp16 1e-2, int8 5e-2), or
    the spec's tolerance.atol where it sets a looser one."""
    from servetool.convert.gate import limits_for

    return max(FP32_SCORE_ATOL, limits_for(spec.format, spec.tolerance).atol)


def _pipeline(library: Library, task: str, **options: Any):
    import logging

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return library.transformers.pipeline(task, model=str(library.folder),
                                             tokenizer=library.tokenizer, device="cpu", **options)
    finally:
        quiet.setLevel(level)


def _library_function(spec: ModelSpec) -> str | None:
    """The pipeline's activation: its own default (from config.json) for class and multi-label
    heads, so a head servetool reads wrongly shows; the spec's choice for score and regression
    heads (sigmoid, CrossEncoder's default, or raw)."""
    if spec.text.head in ("score", "regression"):
        return "sigmoid" if spec.text.score == "sigmoid" else "none"
    return None


def check_classification(spec: ModelSpec, served, library: Library, texts: list[str],
                         pairs: list[tuple[str, str]]) -> str:
    function = _library_function(spec)
    classifier = _pipeline(library, "text-classification", top_k=None,
                           **({"function_to_apply": function} if function else {}))
    tolerance = score_tolerance(spec)
    worst = 0.0
    cases = [(t, None) for t in texts] + list(pairs)
    for i, (text, pair) in enumerate(cases):
        inputs = text if pair is None else {"text": text, "text_pair": pair}
        body = {"inputs": text} if pair is None else {"inputs": [[text, pair]]}
        ours = served.answer_one(json.dumps(body).encode())["predictions"][0]
        found = classifier(inputs, truncation=spec.text.pair_truncation if pair else True,
                           max_length=spec.text.max_length)
        found = found[0] if found and isinstance(found[0], list) else found  # one input, listed
        theirs = {d["label"]: float(d["score"]) for d in found}
        problem, diff = compare_scores(spec, ours, theirs, tolerance)
        worst = max(worst, diff)
        if problem:
            where = _name([c[0] for c in cases], i, pair)
            stage = _head_stage(spec, served, library, classifier.model, text, pair, tolerance)
            raise ReferenceMismatch(f"{spec.name}: servetool's answer differs from {library.name}"
                                    f"'s text-classification pipeline on {where}: {problem}; "
                                    f"tokenization is equal; the stage that differs: {stage}")
    return (f"scores match {library.name}'s text-classification pipeline ({spec.text.head} head"
            f"): labels and order equal, scores within {tolerance:g} (largest difference "
            f"{worst:.1e})")


def compare_scores(spec: ModelSpec, ours: Any, theirs: dict[str, float],
                   tolerance: float) -> tuple[str | None, float]:
    """(what differs or None, the largest score difference) between servetool's predictions for
    one text (per head: a top-k list, every label past the threshold, or {"score"}) and the
    pipeline's score per label."""
    if isinstance(ours, dict):  # a score head: one output
        ours = [{"label": next(iter(theirs)), "score": ours["score"]}]
    missing = [o["label"] for o in ours if o["label"] not in theirs]
    if missing:
        return f"servetool's label(s) {missing} are not the model's {sorted(theirs)}", 0.0
    diffs = [abs(o["score"] - theirs[o["label"]]) for o in ours]
    worst = max(diffs, default=0.0)
    if spec.text.head == "multi_label":
        above = {k for k, v in theirs.items() if v >= spec.text.threshold + tolerance}
        lost = sorted(above - {o["label"] for o in ours})
        if lost:
            return (f"labels above the threshold {spec.text.threshold} are missing: "
                    f"{', '.join(f'{k} ({theirs[k]:.4f})' for k in lost)}"), worst
    elif spec.text.head == "classes":
        ranked = sorted(theirs, key=lambda k: -theirs[k])
        for rank, (o, want) in enumerate(zip(ours, ranked, strict=False)):
            if o["label"] != want and abs(theirs[o["label"]] - theirs[want]) > tolerance:
                return (f"servetool's rank {rank + 1} is {o['label']!r} (library "
                        f"{theirs[o['label']]:.4f}), the library's is {want!r} "
                        f"({theirs[want]:.4f})"), worst
    if worst > tolerance:
        o = ours[int(np.argmax(diffs))]
        return (f"{o['label']!r} scores {o['score']:.5f}, the library {theirs[o['label']]:.5f} "
                f"(difference {worst:.2e}, tolerance {tolerance:g})"), worst
    return None, worst


def _served_outputs(served, text: str, pair: str | None) -> np.ndarray:
    """The served artifact's raw first output for one text (or pair), on the worker's tokens."""
    from handlers.batching import collate

    encoded = served.handler.task.encoder.encode([text], None if pair is None else [pair])[0]
    outputs = served.handler.runtime.run(collate([encoded.feeds], served.handler.inputs))
    return np.asarray(outputs[0][0], np.float64)


def _library_logits(model, library: Library, text: str, pair: str | None) -> np.ndarray:
    import torch

    feeds = library.tokenizer(text, pair, return_tensors="pt",
                              max_length=library.spec.text.max_length,
                              truncation=library.spec.text.pair_truncation if pair else True)
    with torch.inference_mode():
        return model(**feeds).logits[0].double().numpy()


def _head_stage(spec: ModelSpec, served, library: Library, model, text: str, pair: str | None,
                tolerance: float) -> str:
    """runtime: the served logits differ from the library model's on the same tokens; else head:
    the same logits are read into other scores (activation, labels, threshold)."""
    ours = _served_outputs(served, text, pair)
    theirs = _library_logits(model, library, text, pair)
    off = float(np.abs(ours.reshape(-1) - theirs.reshape(-1)).max())
    scale = max(1.0, float(np.abs(theirs).max()))
    if off > tolerance * scale:
        return (f"runtime: the served model's logits differ from the library model's by up to "
                f"{off:.3g} on the same tokens")
    return (f"head: the logits agree (within {off:.1e}) but are read into other scores: "
            f"servetool reads a {spec.text.head} head ({served.handler.task.activation()}), "
            "config.json's problem_type and num_labels say how the library reads it")


def check_reranking(spec: ModelSpec, served, library: Library,
                    pairs: list[tuple[str, str]]) -> str:
    try:
        import sentence_transformers
        import torch
        from sentence_transformers import CrossEncoder
    except Exception as exc:
        raise LibraryMissing(f"sentence-transformers is not importable here "
                             f"({type(exc).__name__}: {exc})") from None
    activation = torch.nn.Sigmoid() if spec.text.score == "sigmoid" else torch.nn.Identity()
    model = CrossEncoder(str(spec.source.path), device="cpu", local_files_only=True,
                         max_length=spec.text.max_length, activation_fn=activation)
    name = f"sentence-transformers {sentence_transformers.__version__}'s CrossEncoder"
    tolerance = score_tolerance(spec)
    want = np.asarray(model.predict(pairs, batch_size=8), np.float64).reshape(-1)
    worst = 0.0
    for i, (query, passage) in enumerate(pairs):
        got = served.answer_one(json.dumps({"inputs": [[query, passage]]}).encode())
        score = float(got["predictions"][0]["score"])
        worst = max(worst, abs(score - want[i]))
        if abs(score - want[i]) > tolerance:
            ours = _served_outputs(served, query, passage)
            theirs = _library_logits(model.model, library, query, passage)
            stage = ("runtime: the served model's logit differs from the library model's by "
                     f"{abs(float(ours[0]) - float(theirs[0])):.3g} on the same tokens"
                     if abs(float(ours[0]) - float(theirs[0])) > tolerance else
                     f"head: the logits agree, servetool's {spec.text.score} reading does not "
                     "match the CrossEncoder's activation")
            raise ReferenceMismatch(f"{spec.name}: servetool's score differs from {name}.predict"
                                    f" on pair #{i} {_preview(query, 24)} / {_preview(passage, 24)}"
                                    f": {score:.5f} vs {want[i]:.5f} (tolerance {tolerance:g}); "
                                    f"the stage that differs: {stage}")
    # TEI's rerank shape: the same scores, ranked
    query = pairs[0][0]
    passages = [p for _, p in pairs[:4]]
    ranked = served.answer_one(json.dumps({"query": query, "texts": passages}).encode())
    expected = np.asarray(model.predict([(query, p) for p in passages]), np.float64).reshape(-1)
    order = [r["index"] for r in ranked]
    if sorted(order) != list(range(len(passages))) or any(
            abs(r["score"] - expected[r["index"]]) > tolerance for r in ranked) or any(
            expected[a] < expected[b] - tolerance for a, b in zip(order[:-1], order[1:], strict=True)):
        raise ReferenceMismatch(f"{spec.name}: servetool's rerank answer {ranked} does not rank "
                                f"as {name} scores ({expected.round(5).tolist()}): the stage that "
                                "differs: postprocessing (the rerank ordering)")
    return (f"scores match {name}.predict on {len(pairs)} (query, passage) pairs within "
            f"{tolerance:g} (largest difference {worst:.1e}), the rerank order too")


# --- token classification ----------------------------------------------------------------------

def check_entities(spec: ModelSpec, served, library: Library, texts: list[str]) -> str:
    tagger = _pipeline(library, "token-classification",
                       aggregation_strategy=spec.text.aggregation)
    tolerance = score_tolerance(spec)
    worst, count = 0.0, 0
    for i, text in enumerate(texts):
        ours = served.answer_one(json.dumps({"inputs": text}).encode())["entities"][0]
        theirs = tagger(text)
        problem, diff = compare_entities(ours, theirs, text, tolerance)
        worst, count = max(worst, diff), count + len(theirs)
        if problem:
            stage = _entity_stage(spec, served, library, tagger.model, text, tolerance)
            raise ReferenceMismatch(f"{spec.name}: servetool's entities differ from {library.name}"
                                    f"'s token-classification pipeline (aggregation_strategy "
                                    f"{spec.text.aggregation}) on {_name(texts, i)}: {problem}; "
                                    f"tokenization is equal; the stage that differs: {stage}")
    return (f"entities match {library.name}'s token-classification pipeline (aggregation "
            f"{spec.text.aggregation}): {count} entities, groups and character offsets equal, "
            f"scores within {tolerance:g} (largest difference {worst:.1e})")


def compare_entities(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], text: str,
                     tolerance: float) -> tuple[str | None, float]:
    worst = 0.0
    for k, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if (a["entity_group"], a["start"], a["end"]) != (b["entity_group"], b["start"], b["end"]):
            return (f"entity {k}: servetool {a['entity_group']} [{a['start']}:{a['end']}] "
                    f"{a['word']!r}, the pipeline {b['entity_group']} [{b['start']}:{b['end']}] "
                    f"{text[b['start']:b['end']]!r}"), worst
        if a["word"] != text[a["start"]:a["end"]]:
            return f"entity {k}: word {a['word']!r} is not the text at its offsets", worst
        worst = max(worst, abs(a["score"] - float(b["score"])))
        if abs(a["score"] - float(b["score"])) > tolerance:
            return (f"entity {k} ({a['entity_group']} {a['word']!r}) scores {a['score']:.5f}, the "
                    f"pipeline {float(b['score']):.5f} (tolerance {tolerance:g})"), worst
    if len(ours) != len(theirs):
        return (f"servetool finds {len(ours)} entities, the pipeline {len(theirs)} (first extra: "
                f"{(ours + theirs)[min(len(ours), len(theirs))]})"), worst
    return None, worst


def _entity_stage(spec: ModelSpec, served, library: Library, model, text: str,
                  tolerance: float) -> str:
    ours = _served_outputs(served, text, None)
    theirs = _library_logits(model, library, text, None)
    if ours.shape != theirs.shape:
        return f"runtime: the served model gives {ours.shape}, the library's {theirs.shape}"
    off = float(np.abs(ours - theirs).max())
    if off > tolerance * max(1.0, float(np.abs(theirs).max())):
        return (f"runtime: the served model's logits differ from the library model's by up to "
                f"{off:.3g} on the same tokens")
    return (f"postprocessing-offsets: the logits agree (within {off:.1e}); servetool groups the "
            f"words or maps them to character offsets otherwise ({spec.text.aggregation})")
