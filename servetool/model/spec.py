"""servetool.yaml -> a validated, typed ModelSpec.

Every error names the file and the dotted key, because a spec is edited by hand and a message like
"expected int" without a place is useless in a 40-line YAML file.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from handlers.preprocess import BOX_FORMATS, BOX_UNITS, CROP_OFFSETS, FITS, INTERPOLATIONS
from servetool.errors import ServetoolError
from servetool.model.formats import FORMATS as FORMAT_TABLE
from servetool.model.formats import ONNX_FAMILY

SPEC_FILE = "servetool.yaml"
FORMATS = tuple(FORMAT_TABLE)
TEXT_TASKS = ("feature-extraction", "text-classification", "token-classification",
              "text-reranking")
TASKS = ("image-classification", "tensor", "object-detection", *TEXT_TASKS)
IMAGE_TASKS = ("image-classification", "object-detection")
DETECTION_LAYOUTS = ("auto", "yolov5", "yolov8", "nms", "detr", "torchvision")
SOURCE_KINDS = ("state_dict", "torchscript", "onnx", "pickled_module", "random_weights",
                "transformers", "exported_program")
# A torch.export program: the program itself, or ONNX made from it. TorchScript (and TensorRT,
# built from TorchScript) are not: tracing the program's module freezes a specialised batch.
PROGRAM_FORMATS = ("exported-program", *ONNX_FAMILY)
POOLINGS = ("mean", "cls")
SCORE_ACTIVATIONS = ("sigmoid", "raw")  # a one-output head's score: CrossEncoder's default, or the logit
AGGREGATIONS = ("first", "simple", "average", "max")  # transformers' token-classification strategies
PAIR_TRUNCATIONS = ("longest_first", "only_second")  # tokenizers' strategies for a text pair
TORCHSCRIPT_METHODS = ("auto", "trace", "script")
GRAPH_OPTIMIZATION = ("disabled", "basic", "extended", "all")
DTYPES = ("float32", "float64", "int64", "int32")
NAME_RE = re.compile(r"\A[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
VERSION_RE = re.compile(r"\A[0-9A-Za-z][0-9A-Za-z._-]{0,31}\Z")


class SpecError(ServetoolError):
    """A servetool.yaml that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Source:
    kind: str  # one of SOURCE_KINDS
    path: Path | None  # the state_dict, TorchScript or ONNX file (None for random_weights)
    model_file: Path | None = None  # state_dict/random_weights: the file that defines the class
    class_name: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # random_weights: torch.manual_seed before building the model
    trust_pickle: bool = False  # pickled_module: the explicit opt-in (unpickling runs code)


@dataclass(frozen=True)
class InputSpec:
    """One named model input: its shape for one example (no batch axis), where a string is a
    dynamic axis named so (the same name on two inputs is one length), its dtype, and the value
    that pads a dynamic axis when requests of different lengths share a batch."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    pad: float = 0
    allow_nonfinite: bool = False
    # [low, high): the values the gate's sample inputs take. Integer inputs are often indices
    # (token ids, type ids, masks), so the default there is [0, 2), valid for any of them.
    range: tuple[float, float] | None = None

    @property
    def dynamic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "pad": self.pad, "allow_nonfinite": self.allow_nonfinite}


@dataclass(frozen=True)
class ExportOptions:
    torchscript_method: str = "auto"  # auto: trace, and script where the trace disagrees
    onnx_simplify: bool = True  # onnxslim after export
    onnx_opset: int | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    graph_optimization: str = "all"
    intra_op_threads: int | None = None  # None: cores // max workers, decided on the server
    inter_op_threads: int = 1
    optimized_model: bool = False  # ship an ONNX Runtime pre-optimised model (faster worker start)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class DataRef:
    """A labelled (validation) or unlabelled (calibration) set: an .npz of model inputs (`x`, and
    `y` for labels), or a folder of images that the spec's own preprocessing turns into inputs
    (labelled by sub-folder name, like torchvision's ImageFolder)."""

    path: Path
    samples: int | None = None
    images: bool = False
    texts: bool = False  # a text file of labelled lines: LABEL<TAB>TEXT
    coco: bool = False  # a COCO instances file (boxes), its images beside it or in image_dir
    image_dir: Path | None = None

    @property
    def has_labels(self) -> bool:
        """Whether the set says what the right answers are (a `y` array in an .npz; an image
        folder, a texts file and COCO boxes always do)."""
        if self.images or self.texts or self.coco:
            return True
        import numpy as np

        with np.load(self.path) as data:
            return "y" in data.files

    def labelled_texts(self) -> list[tuple[str, str]]:
        """(label, text) per line of a texts file; SpecError naming a line without a tab."""
        pairs = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab or not text.strip():
                raise SpecError(f"{self.path}:{number}: expected LABEL<TAB>TEXT, got {line[:80]!r}")
            pairs.append((label.strip(), text))
        return pairs[: self.samples] if self.samples else pairs

    def plain_texts(self) -> list[str]:
        """A calibration texts file: one text per non-empty line, as written (no labels)."""
        texts = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
        return texts[: self.samples] if self.samples else texts

    def load(self, names: list[str] | None = None) -> tuple[Any, Any]:
        """(x, y): x an array, or {input name: array} for a model of several inputs (the .npz
        then holds one array per input name instead of x)."""
        import numpy as np

        with np.load(self.path) as data:
            keys = names if names and len(names) > 1 else ["x"]
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise SpecError(f"{self.path}: holds {', '.join(data.files)}, not "
                                f"{', '.join(missing)} (one array per model input"
                                + (", under its name)" if len(keys) > 1 else ")"))
            arrays = {k: data[k][: self.samples] if self.samples else data[k] for k in keys}
            count = len(next(iter(arrays.values())))
            y = data["y"][:count] if "y" in data.files else None
        return (arrays["x"] if keys == ["x"] else arrays), y

    def detector_images(self) -> tuple[list[bytes], list[Any] | None]:
        """A detector's images (a COCO file's, or a folder's), with their true boxes (coco_eval's
        Labelled) when the set is a COCO file."""
        if self.coco:
            from servetool.model.coco_eval import read_coco

            labelled = read_coco(self.path, self.image_dir)[0][: self.samples]
            return [t.file.read_bytes() for t in labelled], labelled
        if self.images:
            return [path.read_bytes() for path, _ in self.image_files()], None
        return [], None

    def image_files(self) -> list[tuple[Path, str | None]]:
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        labelled = [(p, p.parent.name if p.parent != self.path else None) for p in files]
        return labelled[: self.samples] if self.samples else labelled


@dataclass(frozen=True)
class Tolerance:
    """Overrides of the per-format defaults in formats.py (None: keep the default)."""

    atol: float | None = None
    rtol: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None
    min_cosine: float | None = None  # per-example cosine similarity floor (embeddings)
    max_map_drop: float | None = None  # detectors: points of mAP@0.5:0.95 a format may lose
    min_box_match: float | None = None  # detectors: share of the original's boxes found again


@dataclass(frozen=True)
class TextOptions:
    """How a text task tokenizes: the tokenizer file the worker loads, the longest input and what
    happens beyond it, the texts one request may carry, and (embeddings) pooling."""

    tokenizer: Path
    max_length: int
    truncate: bool = True  # False: a longer text is refused (413) naming its length and the limit
    max_texts: int = 32
    pooling: str = "mean"  # feature-extraction: mean over the attention mask, or the CLS token
    normalize: bool = False  # feature-extraction: L2-normalised embeddings
    samples: Path | None = None  # sentences, one per line, for the gate
    labels: tuple[str, ...] | None = None  # classifiers: from config.json's id2label
    multi_label: bool = False  # text-classification: sigmoid per label instead of softmax
    # text-classification / text-reranking: how the head's outputs read (servetool.model.hf.head_kind):
    # classes | multi_label | score | regression
    head: str = "classes"
    score: str = "sigmoid"  # score and regression heads: sigmoid | raw
    threshold: float = 0.5  # multi_label: every label whose sigmoid is >= this
    aggregation: str = "first"  # token-classification: the pipeline's strategy
    pair_truncation: str = "longest_first"  # a text pair over max_length: which side is cut

    def handler_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.name, "max_length": self.max_length,
                "truncate": self.truncate, "max_texts": self.max_texts, "pooling": self.pooling,
                "normalize": self.normalize, "multi_label": self.multi_label, "head": self.head,
                "score": self.score, "threshold": self.threshold,
                "aggregation": self.aggregation, "pair_truncation": self.pair_truncation}


@dataclass(frozen=True)
class DetectionOptions:
    """How a detector's output is read (handlers/detection.py): its layout, the thresholds a
    request gets by default, and how far a request may move them."""

    layout: str = "auto"  # auto: from the output's shape and the number of labels
    confidence: float = 0.25
    iou: float = 0.45
    max_detections: int = 100
    max_candidates: int = 3000
    min_confidence: float = 0.001  # the lowest confidence a request may ask for
    max_detections_limit: int = 300  # the most detections a request may ask for
    scale: float = 1 / 255  # pixel values times this (1: the model takes 0-255)
    box_format: str | None = None  # xyxy | xywh | cxcywh; None: the layout's usual one
    box_units: str | None = None  # pixels (of the model input) | normalized; None: the layout's
    # letterbox (aspect kept, padded to the input size) | letterbox-rect (padded only up to a
    # multiple of `stride`: ultralytics' predictor on an input with free height and width) |
    # stretch (to the input size)
    fit: str = "letterbox"
    stride: int = 32  # letterbox-rect's: each side a multiple of it (the model's largest stride)

    def handler_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preprocess:
    grayscale: bool = False
    # (height, width): exact; an int: the shorter side, aspect kept (torchvision's Resize(int))
    resize: tuple[int, int] | int | None = None
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest (antialiased, as torchvision)
    center_crop: tuple[int, int] | None = None
    crop_offsets: str = "round"  # round: torchvision's CenterCrop; floor: Hugging Face processors'
    letterbox: dict[str, Any] | None = None  # {fill}: fit inside the input size, aspect kept
    # true: large JPEGs decode at a reduced scale, faster but other pixels than the model was
    # trained on, so only when asked for (see handlers/imaging.py)
    jpeg_draft: bool = False
    invert: bool = False  # dark ink on light paper -> the light-on-dark the model was trained on
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_pixels: int | None = None  # None: bounded by the model's input size (handlers.imaging)
    formats: tuple[str, ...] | None = None  # None: JPEG, PNG, GIF, BMP, WebP, TIFF

    def as_dict(self) -> dict[str, Any]:
        return {
            "grayscale": self.grayscale,
            "resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
            "interpolation": self.interpolation,
            "center_crop": list(self.center_crop) if self.center_crop else None,
            "crop_offsets": self.crop_offsets,
            "letterbox": dict(self.letterbox) if self.letterbox else None,
            "jpeg_draft": self.jpeg_draft,
            "invert": self.invert,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "max_pixels": self.max_pixels,
            "formats": list(self.formats) if self.formats else None,
        }


PRUNE_TARGETS = ("speedup", "macs_ratio", "params_ratio")
IMPORTANCES = ("l1", "l2", "taylor")  # group L1/L2 magnitude, or first-order Taylor (needs data)


@dataclass(frozen=True)
class PruneOptions:
    """Structured pruning (servetool/convert/compress/prune.py): channels removed to reach one target."""

    target: str  # speedup (original MACs / pruned), macs_ratio or params_ratio (pruned / original)
    value: float
    importance: str = "l1"
    keep: tuple[str, ...] | None = None  # module names kept whole; None: the classifier head
    round_to: int = 8  # channel counts stay multiples of this (kernels run full vectors)
    steps: int = 1  # prune in this many steps, recovering between them where one loses too much
    max_layer_ratio: float = 0.9  # the most of one layer's channels any step may remove


@dataclass(frozen=True)
class DistillOptions:
    """Recovery by knowledge distillation from the original (servetool/convert/compress/distill.py)."""

    # the training data: an image folder (labels from sub-folders) or an .npz; None when it is
    # not there yet (made on demand, as models/digits-resnet's train.npz): the spec still loads
    # for package and deploy, and compress refuses with `train_problem`
    train: DataRef | None
    epochs: int = 10
    lr: float = 1e-3
    batch: int = 64
    temperature: float = 4.0
    alpha: float = 0.5  # weight of cross-entropy on the labels (where there are labels)
    max_minutes: float | None = None  # the training time budget, all epochs together
    patience: int = 3  # epochs without a better held-out accuracy before stopping
    holdout: float = 0.1  # the share of the training data early stopping judges (not trained on)
    step_epochs: int = 1  # recovery between pruning steps, when a step lost too much
    seed: int = 0
    train_problem: str | None = None


@dataclass(frozen=True)
class StudentOptions:
    """A smaller model class the user gives, distilled from the original instead of pruning it."""

    model_file: Path
    class_name: str
    init_args: dict[str, Any] = field(default_factory=dict)
    state_dict: Path | None = None  # its starting weights (default: the class's own init)


@dataclass(frozen=True)
class CompressOptions:
    prune: PruneOptions | None = None
    distill: DistillOptions | None = None
    student: StudentOptions | None = None
    max_accuracy_drop: float = 1.0  # top-1 points the result may lose against the original
    int8: bool = False  # static int8 on top (onnx-int8-static): the new version's format
    # the serving formats each step's latency is measured in (the first: the primary columns)
    formats: tuple[str, ...] = ("onnx", "torchscript")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    directory: Path
    spec_file: Path
    source: Source
    input_shape: tuple[int, ...]  # one example, without the batch axis
    input_dtype: str
    format: str
    task: str
    preprocess: Preprocess
    labels: Path | None
    top_k: int
    batch_size: int
    max_batch_delay_ms: int
    min_workers: int | None  # None: "auto", one worker per core of the serving machine
    max_workers: int | None
    response_timeout_s: int
    export: ExportOptions = ExportOptions()
    runtime: RuntimeOptions = RuntimeOptions()
    validation: DataRef | None = None
    calibration: DataRef | None = None
    tolerance: Tolerance = Tolerance()
    allow_nonfinite: bool = False  # NaN and infinity in tensor requests (refused by default)
    max_request_bytes: int | None = None  # the largest request body; None: from the input shape
    inputs: tuple[InputSpec, ...] = ()  # every input by name (input_shape/dtype: the first's)
    outputs: tuple[str, ...] = ()  # output names for an export (default: output, output_0, ...)
    text: TextOptions | None = None  # the text tasks'
    detection: DetectionOptions | None = None  # object-detection's
    compress: CompressOptions | None = None  # `servetool compress`'s section
    label_list: tuple[str, ...] = ()  # class names read from the model file (no labels file)
    inferred: tuple[str, ...] = ()  # what was read from the model file, one line each

    def is_text(self) -> bool:
        return self.task in TEXT_TASKS

    def detector(self, full_canvas: bool = False):
        """The serving task of a detector (handlers/detection.py): the gate, validation and
        calibration preprocess and decode exactly as the handler does. `full_canvas`: a
        letterbox-rect detector letterboxes to the whole input size instead (one array of
        same-sized images, as calibration data must be; a valid input of the same model)."""
        from handlers.detection import ObjectDetection

        options = self.detection or DetectionOptions()
        if full_canvas and options.fit == "letterbox-rect":
            options = replace(options, fit="letterbox")
        return ObjectDetection({"input_shape": list(self.input_shape),
                                "inputs": [i.as_dict() for i in self.inputs],
                                "preprocess": self.preprocess.as_dict(),
                                "detection": options.handler_dict()},
                               self.label_names())

    def image_task(self):
        """The serving task of an image classifier (handlers/tasks.py): images decode and
        preprocess exactly as the handler does them."""
        from handlers.tasks import ImageClassification

        return ImageClassification({"input_shape": list(self.input_shape),
                                    "input_dtype": self.input_dtype,
                                    "preprocess": self.preprocess.as_dict()}, None)

    def label_names(self) -> list[str] | None:
        if self.labels is None:
            if self.label_list:
                return list(self.label_list)
            return list(self.text.labels) if self.text and self.text.labels else None
        return [line.strip() for line in self.labels.read_text().splitlines() if line.strip()]


class _Reader:
    """Typed access to one mapping of the YAML, recording which keys were read."""

    def __init__(self, data: Any, where: str, file: Path) -> None:
        self.file = file
        self.where = where
        if not isinstance(data, dict):
            self.fail(f"must be a mapping, got {_kind(data)}")
        self.data = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, message: str, key: str | None = None) -> None:
        place = f"key '{key}'" if key else (f"key '{self.where}'" if self.where else "top level")
        raise SpecError(f"{self.file}: {place} {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *, check=None) -> Any:
        self.seen.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                self.fail("is required", self.key(name))
            return default
        value = self.data[name]
        # bool is an int in Python; a spec that says `batch: true` is a mistake, not 1.
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(f"must be {_names(kinds)}, got a boolean", self.key(name))
        if not isinstance(value, kinds):
            self.fail(f"must be {_names(kinds)}, got {_kind(value)} {value!r}", self.key(name))
        if check is not None:
            problem = check(value)
            if problem:
                self.fail(problem, self.key(name))
        return value

    def child(self, name: str, default: Any = ...) -> _Reader | None:
        self.seen.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                self.fail("is required", self.key(name))
            return None
        return _Reader(self.data[name], self.key(name), self.file)

    def finish(self) -> None:
        unknown = sorted(set(map(str, self.data)) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            self.fail(f"is not a known key (known here: {known})", self.key(unknown[0]))


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer",
            float: "a number", bool: "a boolean"}.get(type(value), type(value).__name__)


def _names(kinds: tuple[type, ...]) -> str:
    return " or ".join(_kind(k()) if k is not type(None) else "null" for k in kinds)


def _positive(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1, got {value}"


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def _one_of(choices: tuple[str, ...]):
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"


def _int_list(length: int | None = None):
    def check(value: list) -> str | None:
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return f"must be a list of positive integers, got {value!r}"
        if length is not None and len(value) != length:
            return f"must have {length} entries, got {len(value)}"
        return None

    return check


def _size(value: int | list) -> str | None:
    if isinstance(value, int):
        return None if value >= 1 else f"must be a positive size, got {value}"
    return _int_list(2)(value)


def _byte(value: int) -> str | None:
    return None if 0 <= value <= 255 else f"must be a pixel value 0-255, got {value}"


def _number_list(value: list) -> str | None:
    ok = value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return None if ok else f"must be a non-empty list of numbers, got {value!r}"


def _existing_file(reader: _Reader, directory: Path, key: str, rel: str) -> Path:
    path = (directory / rel).resolve()
    if not path.is_file():
        reader.fail(f"names a file that does not exist: {path}", reader.key(key))
    return path


def load_spec(path: str | Path) -> ModelSpec:
    """Read and validate a model directory's servetool.yaml (or the file itself)."""
    path = Path(path)
    spec_file = path / SPEC_FILE if path.is_dir() else path
    if not spec_file.is_file():
        raise SpecError(f"{spec_file}: no such spec file (a model directory holds a {SPEC_FILE})")
    try:
        raw = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{spec_file}: not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_spec(raw, spec_file)


def parse_spec(raw: Any, spec_file: Path) -> ModelSpec:
    directory = spec_file.resolve().parent
    top = _Reader(raw, "", spec_file)
    name = top.get("name", str, check=lambda v: None if NAME_RE.match(v) else
                   "must start with a letter and hold only letters, digits, '-' and '_' (max 64)")
    version = str(top.get("version", (str, int, float), "1.0"))
    if not VERSION_RE.match(version):
        top.fail(f"must be a version like 1.0 or 2, got {version!r}", "version")
    source = _parse_source(top.child("source"), directory)
    fmt = top.get("format", str, "onnx", check=_one_of(FORMATS))
    if source.kind == "onnx" and fmt not in ONNX_FAMILY:
        top.fail(f"is {fmt!r}, but an ONNX source can only be served as one of "
                 f"{', '.join(ONNX_FAMILY)}", "format")
    if source.kind == "exported_program" and fmt not in PROGRAM_FORMATS:
        top.fail(f"is {fmt!r}, but a torch.export program is served as one of "
                 f"{', '.join(PROGRAM_FORMATS)}: TorchScript is not made from a program (a trace "
                 "of its module freezes a specialised batch, and TorchScript is deprecated)",
                 "format")
    inputs = _parse_inputs(top, source)
    outputs = tuple(top.get("outputs", list, [], check=lambda v: None if all(
        isinstance(n, str) and INPUT_NAME.match(n) for n in v) and len(set(v)) == len(v)
        else f"must be a list of distinct output names, got {v!r}"))
    shape, dtype, allow_nonfinite = inputs[0].shape, inputs[0].dtype, inputs[0].allow_nonfinite
    task = top.get("task", str, _default_task(source), check=_one_of(TASKS))
    hints = _file_hints(top, source, task)
    if task == "object-detection" and hints.dynamic_hw and hints.imgsz and "input" not in top.data:
        inputs = _largest_image_input(inputs, hints.imgsz)
        shape = inputs[0].shape
    _image_config_hints(top, source, task, hints, shape)
    pre = _parse_preprocess(top.child("preprocess", None), spec_file)
    given_pre = top.data.get("preprocess") or {}
    pre = replace(pre, **{k: v for k, v in hints.preprocess.items() if k not in given_pre})
    labels_rel = top.get("labels", str, None)
    labels = _existing_file(top, directory, "labels", labels_rel) if labels_rel else None
    top_k = top.get("top_k", int, 5, check=_positive)
    batch = top.child("batch", None)
    batch_size = batch.get("size", int, 1, check=_positive) if batch else 1
    delay = batch.get("max_delay_ms", int, 0, check=_non_negative) if batch else 0
    if batch:
        batch.finish()
    min_w, max_w = _parse_workers(top.child("workers", None))
    timeout = top.get("response_timeout_s", int, 120, check=_positive)
    max_request_bytes = top.get("max_request_bytes", int, None, check=_positive)
    export = _parse_export(top.child("export", None))
    runtime = _parse_runtime(top.child("runtime", None))
    # a tensor model's validation .npz may hold inputs only (features, not classes: the gate
    # then judges parity alone, and compress its cosine to the original)
    validation = _parse_data(top.child("validation", None), directory,
                             top.data.get("task") != "tensor", inputs,
                             top.data.get("task") == "object-detection")
    calibration = _parse_data(top.child("calibration", None), directory, False, inputs)
    tolerance = _parse_tolerance(top.child("tolerance", None))
    compress = _parse_compress(top.child("compress", None), directory, inputs)
    text = None
    if task in TEXT_TASKS:
        text = _parse_text(top.child("text", None), top, task, source, directory)
        for key, ref in (("validation", validation), ("calibration", calibration)):
            if ref is not None and not ref.texts:
                top.fail("must be {texts: FILE} for a text model (" + (
                    "LABEL<TAB>TEXT lines)" if key == "validation" else "one text per line)"), key)
        if validation is not None and task != "text-classification":
            top.fail(f"labelled texts judge a text classifier's accuracy; {task} has none to "
                     "judge (its gate compares with the original on text.samples)", "validation")
    elif "text" in top.data:
        tensor_text = top.child("text", None)
        if not (task == "tensor" and source.kind == "transformers" and tensor_text is not None
                and set(tensor_text.data) <= {"hidden_states"}):
            top.fail(f"is for the text tasks ({', '.join(TEXT_TASKS)}); task is {task} (a "
                     "Hugging Face folder as tensor takes text.hidden_states only)", "text")
        tensor_text.get("hidden_states", bool, False)
    _refuse_dropped_head(top, task, source)
    if task not in TEXT_TASKS and calibration is not None and calibration.texts:
        top.fail(f"texts calibrate a text model; task {task} takes "
                 f"{calibration_hint(task)}", "calibration")
    detection = None
    if task == "object-detection":
        detection = _parse_detection(top.child("detection", None), hints.detection)
        if detection.fit == "letterbox-rect" and not getattr(hints, "dynamic_hw", False):
            top.fail(f"letterbox-rect feeds each image at its own size, but {source.path.name} "
                     f"takes a fixed {list(shape)[1:]}: use detection.fit: letterbox (or export "
                     "the model with dynamic height and width, e.g. ultralytics' dynamic=True)",
                     "detection.fit")
        if calibration is not None and calibration.coco:
            top.fail("takes images or an .npz for a detector (no boxes needed)", "calibration")
    elif "detection" in top.data:
        top.fail(f"is for task object-detection; task is {task}", "detection")
    elif validation is not None and validation.coco:
        top.fail("is a COCO file of boxes, which only an object-detection model uses", "validation")
    top.finish()
    # a text model without calibration texts is calibrated on servetool's representative set
    if fmt == "onnx-int8-static" and calibration is None and validation is None and (
            task not in TEXT_TASKS):
        top.fail(f"is onnx-int8-static, which needs calibration data: add {calibration_hint(task)}",
                 "format")

    if source.kind == "transformers" and task not in (*TEXT_TASKS, "tensor") and not (
            task == "image-classification" and _is_image_folder(source)):
        top.fail(f"is {task}, but a Hugging Face text model serves one of {', '.join(TEXT_TASKS)} "
                 "(or tensor, for raw token ids)", "task")
    if task == "text-classification" and not (labels or (text and text.labels)):
        top.fail("needs labels: config.json's id2label, or a labels file", "labels")
    if task == "object-detection":
        if pre.resize or pre.center_crop or pre.mean or pre.std:
            top.fail("a detector's image is letterboxed to its input and scaled by "
                     "detection.scale: drop resize, center_crop, mean and std", "preprocess")
        pre = replace(pre, letterbox=pre.letterbox or {"fill": 114})
    if task in ("image-classification", "object-detection"):
        if len(inputs) != 1 or inputs[0].dynamic:
            top.fail(f"{task} takes one input of a fixed [channels, height, width]; "
                     f"this model has {len(inputs)} ({_describe_inputs(inputs)}): use task: tensor",
                     "task")
        if len(shape) != 3 or shape[0] not in (1, 3):
            top.fail(f"must be [channels, height, width] with 1 or 3 channels for "
                     f"{task}, got {list(shape)}", "input.shape")
        if (shape[0] == 1) != pre.grayscale:
            top.fail(f"says grayscale={pre.grayscale} but input.shape has {shape[0]} channel(s)",
                     "preprocess.grayscale")
        for key, values in (("mean", pre.mean), ("std", pre.std)):
            if values is not None and len(values) not in (1, shape[0]):
                top.fail(f"has {len(values)} values for {shape[0]} channel(s)", f"preprocess.{key}")
        _check_geometry(top, pre, shape[1], shape[2])
    spec = ModelSpec(
        name=name, version=version, directory=directory, spec_file=spec_file, source=source,
        input_shape=shape, input_dtype=dtype, format=fmt, task=task, preprocess=pre,
        labels=labels, top_k=top_k, batch_size=batch_size, max_batch_delay_ms=delay,
        min_workers=min_w, max_workers=max_w, response_timeout_s=timeout, export=export,
        runtime=runtime, validation=validation, calibration=calibration, tolerance=tolerance,
        allow_nonfinite=allow_nonfinite, max_request_bytes=max_request_bytes, inputs=inputs,
        outputs=outputs, text=text, detection=detection, compress=compress,
        label_list=tuple(hints.labels or ()) if labels is None and task in IMAGE_TASKS else (),
        inferred=tuple(hints.notes),
    )
    if labels is not None and not spec.label_names():
        top.fail(f"names an empty labels file: {labels}", "labels")
    return spec


INPUT_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.:/-]{0,127}\Z")
AXIS_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def calibration_hint(task: str) -> str:
    """The spec keys that give static int8 its calibration data, for a model of `task`."""
    if task in IMAGE_TASKS:
        return ("calibration.images (a folder of images like those it will serve) or "
                "calibration.data (an .npz with x)")
    if task in TEXT_TASKS:
        return "calibration.texts (a file of texts like those it will serve, one per line)"
    return "calibration.data (an .npz with x)"


def _largest_image_input(inputs: tuple[InputSpec, ...], imgsz: list[int]
                         ) -> tuple[InputSpec, ...]:
    """A detector whose file leaves height and width free (ultralytics' dynamic=True export):
    its input is described at the size it was exported at, the largest canvas it is fed (the gate,
    calibration and the archive's config see a fixed [channels, height, width]; the handler's
    letterbox-rect feeds smaller ones)."""
    first = inputs[0]
    if len(first.shape) != 3 or not isinstance(first.shape[0], int):
        return inputs
    fixed = replace(first, shape=(first.shape[0], int(imgsz[0]), int(imgsz[1])))
    return (fixed, *inputs[1:])


def _parse_inputs(top: _Reader, source: Source) -> tuple[InputSpec, ...]:
    """`input:` (one), `inputs:` (several, by name), or, for an ONNX source, the file's own."""
    if "input" in top.data and "inputs" in top.data:
        top.fail("and input both given: use input for one, inputs for several", "inputs")
    if source.kind == "exported_program":
        return _program_spec_inputs(top, source.path)
    if "inputs" in top.data:
        items = top.get("inputs", list, check=lambda v: None if v else "must list an input")
        inputs = tuple(_parse_input(_Reader(item, f"inputs[{i}]", top.file), None)
                       for i, item in enumerate(items))
        names = [i.name for i in inputs]
        if len(set(names)) != len(names):
            top.fail(f"names an input twice: {names}", "inputs")
        return inputs
    if "input" in top.data:
        default = onnx_inputs(source.path)[0].name if source.kind == "onnx" else "input"
        return (_parse_input(top.child("input"), default),)
    top.seen.add("input")
    if source.kind == "onnx":  # read from the file: names, dtypes, fixed and dynamic axes
        return onnx_inputs(source.path)
    if source.kind == "transformers":  # what its tokenizer feeds this model
        return _transformers_inputs(source.path)
    top.fail("is required (or inputs, for several): the shape and dtype the model takes", "input")
    raise AssertionError


def _parse_input(inp: _Reader, default_name: str | None) -> InputSpec:
    if not isinstance(inp.data, dict):
        inp.fail("must be a mapping with name, shape and dtype")
    name = inp.get("name", str, default_name if default_name else ...,
                   check=lambda v: None if INPUT_NAME.match(v) else f"is not a usable name: {v!r}")
    raw_shape = inp.get("shape", list)
    shape: list[int | str] = []
    for i, dim in enumerate(raw_shape):
        if dim is None or dim == -1:  # dynamic, unnamed: named for its axis (batch is 0)
            shape.append(f"{name.replace('.', '_')}_{i + 1}")
        elif _axis(dim):
            shape.append(dim)
        else:
            inp.fail(f"has {dim!r} at position {i}: an axis is a positive length, or a name "
                     "(or null) for a dynamic one, e.g. [seq] or [3, null, null]",
                     inp.key("shape"))
    result = InputSpec(
        name=name, shape=tuple(shape),
        dtype=inp.get("dtype", str, "float32", check=_one_of(DTYPES)),
        pad=inp.get("pad", (int, float), 0),
        allow_nonfinite=inp.get("allow_nonfinite", bool, False),
        range=_range(inp))
    inp.finish()
    return result


def _range(inp: _Reader) -> tuple[float, float] | None:
    value = inp.get("range", list, None, check=lambda v: None if len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and v[0] < v[1]
        else f"must be [low, high] with low < high, got {v!r}")
    return (value[0], value[1]) if value else None


def _axis(dim: Any) -> bool:
    """A fixed length, or a dynamic axis's name."""
    if isinstance(dim, str):
        return bool(AXIS_NAME.match(dim))
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1


ONNX_DTYPES = {1: "float32", 11: "float64", 7: "int64", 6: "int32"}


def onnx_inputs(path: Path) -> tuple[InputSpec, ...]:
    """An ONNX file's inputs (not its initializers), without their batch axis."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:
        raise SpecError(f"{path}: not an ONNX model ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())})") from None
    weights = {i.name for i in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type not in ONNX_DTYPES:
            raise SpecError(f"{path}: input {value.name!r} has ONNX element type "
                            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which servetool "
                            f"does not take ({', '.join(ONNX_DTYPES.values())})")
        dims = list(tensor.shape.dim)[1:]  # the first axis is the batch
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                      (d.dim_param if AXIS_NAME.match(d.dim_param or "") else
                       f"{value.name.replace('.', '_')}_{i}")
                      for i, d in enumerate(dims, start=1))
        inputs.append(InputSpec(value.name, shape, ONNX_DTYPES[tensor.elem_type]))
    if not inputs:
        raise SpecError(f"{path}: the model has no inputs")
    return tuple(inputs)


PROGRAM_FIX = {"state_dict": "name it source.state_dict (with model_file and class)",
               "torchscript": "name it source.torchscript",
               "pickled_module": "name it source.pickled_module (with trust_pickle: true)",
               "onnx": "name it source.onnx"}


def program_inputs(path: Path) -> tuple[InputSpec, ...]:
    """A torch.export program's inputs, without their batch axis (a fixed or dynamic batch is
    the runtime's business: handlers.runtimes.program_batch)."""
    from servetool.errors import whole_cause
    from servetool.model.torch_files import PROGRAM, SOURCE_KEYS, saved_as

    kind = saved_as(path)
    if kind != PROGRAM:
        key = "onnx" if path.suffix.lower() == ".onnx" else SOURCE_KEYS.get(kind, "")
        fix = PROGRAM_FIX.get(key, "save the program with "
                              "torch.export.save(torch.export.export(model, example), path)")
        raise SpecError(f"{path}: named as source.exported_program, but it is {kind}, not a "
                        f"torch.export program: {fix}")
    from handlers.runtimes import load_program
    from handlers.runtimes import program_inputs as signature

    try:
        program = load_program(str(path))
    except Exception as exc:
        raise SpecError(f"{path}: torch.export.load failed: {whole_cause(exc)}") from None
    inputs = []
    for name, shape, dtype in signature(program):
        dtype_name = str(dtype).removeprefix("torch.")
        if not shape:
            raise SpecError(f"{path}: the program's input {name!r} is "
                            f"{'a tensor without a batch axis' if shape == [] else 'not a tensor'}; "
                            "servetool feeds batches of tensors: re-export with tensor inputs "
                            "whose first axis is the batch")
        if dtype_name not in DTYPES:
            raise SpecError(f"{path}: the program's input {name!r} is {dtype_name}, which "
                            f"servetool does not take ({', '.join(DTYPES)})")
        inputs.append(InputSpec(name, tuple(shape[1:]), dtype_name))
    if not inputs:
        raise SpecError(f"{path}: the program has no tensor inputs")
    return tuple(inputs)


def _program_spec_inputs(top: _Reader, path: Path) -> tuple[InputSpec, ...]:
    """The program's inputs; or the spec's (input or inputs), which may name them, narrow a
    dynamic axis to a length, or set pad and range, but must not contradict the program."""
    program = program_inputs(path)
    if "inputs" in top.data:
        key = "inputs"
        items = top.get(key, list, check=lambda v: None if v else "must list an input")
        given = tuple(_parse_input(_Reader(item, f"inputs[{i}]", top.file),
                                   program[i].name if i < len(program) else None)
                      for i, item in enumerate(items))
    elif "input" in top.data:
        key, given = "input", (_parse_input(top.child("input"), program[0].name),)
    else:
        top.seen.add("input")
        return program
    if len(given) != len(program):
        top.fail(f"gives {len(given)} input(s) ({_describe_inputs(given)}), but the program "
                 f"{path.name} takes {len(program)} ({_describe_inputs(program)}); leave {key} "
                 "out to use the program's", key)
    for i, (mine, theirs) in enumerate(zip(given, program, strict=True)):
        fixed_differ = len(mine.shape) != len(theirs.shape) or any(
            isinstance(t, int) and m != t for m, t in zip(mine.shape, theirs.shape, strict=True))
        if fixed_differ or mine.dtype != theirs.dtype:
            top.fail(f"gives {mine.name} {list(mine.shape)} {mine.dtype}, but the program "
                     f"{path.name} takes {theirs.name} {list(theirs.shape)} {theirs.dtype} "
                     f"(without the batch axis): correct it, or leave {key} out to use the "
                     "program's", key if key == "input" else f"inputs[{i}]")
    if len({i.name for i in given}) != len(given):
        top.fail(f"names an input twice: {[i.name for i in given]}", key)
    return given


def _describe_inputs(inputs: tuple[InputSpec, ...]) -> str:
    return ", ".join(f"{i.name} {list(i.shape)} {i.dtype}" for i in inputs)


def _parse_source(src: _Reader, directory: Path) -> Source:
    kinds = [k for k in SOURCE_KINDS if k in src.data]
    if len(kinds) != 1:
        src.fail(f"must name exactly one of {', '.join(SOURCE_KINDS)}; got {kinds or 'none'}")
    kind = kinds[0]
    path = None
    if kind == "random_weights":
        # Explicit, so that a forgotten state_dict is an error and not a silently untrained model.
        if src.get(kind, bool) is not True:
            src.fail("must be true (or name a state_dict instead)", src.key(kind))
    elif kind == "transformers":
        path = _transformers_folder(src, directory)
    else:
        path = _existing_file(src, directory, kind, src.get(kind, str))
        _refuse_a_program_under(src, kind, path)
    model_file = class_name = None
    init_args: dict[str, Any] = {}
    seed = 0
    if kind in ("state_dict", "random_weights"):
        model_file = _existing_file(src, directory, "model_file", src.get("model_file", str))
        class_name = src.get("class", str, check=lambda v: None if v.isidentifier() else
                             f"must be a Python class name, got {v!r}")
        init_args = src.get("init_args", dict, {})
        seed = src.get("seed", int, 0) if kind == "random_weights" else 0
    trust = False
    if kind == "pickled_module":
        # The class may live in a model.py the pickle refers to (or was defined in __main__).
        rel = src.get("model_file", str, None)
        model_file = _existing_file(src, directory, "model_file", rel) if rel else None
        trust = src.get("trust_pickle", bool, False)
        if not trust:
            src.fail(f"names {path.name}, a whole pickled module (torch.save(model)): loading it "
                     "unpickles, which runs code from the file. Set source.trust_pickle: true if "
                     "you trust where it came from, or save and name a state_dict instead",
                     src.key(kind))
    src.finish()
    return Source(kind, path, model_file, class_name, init_args, seed, trust)


def _refuse_a_program_under(src: _Reader, kind: str, path: Path) -> None:
    """A .pt2 under another key: its loader would call it corrupted (torch.load, torch.jit.load)."""
    from servetool.model.torch_files import is_exported_program

    if kind != "exported_program" and is_exported_program(path):
        what = {"torchscript": "TorchScript", "pickled_module": "pickled module",
                "onnx": "ONNX"}.get(kind, kind)
        src.fail(f"names {path.name}, which is a torch.export program (torch.export.save), not a "
                 f"{what} file: name it source.exported_program (its inputs are read from the "
                 "program)", src.key(kind))


def _transformers_folder(src: _Reader, directory: Path) -> Path:
    from servetool.model import hf

    folder = (directory / src.get("transformers", str)).resolve()
    if not folder.is_dir():
        src.fail(f"names a folder that does not exist: {folder} (a Hugging Face model folder: "
                 "config.json, the weights, tokenizer.json)", src.key("transformers"))
    missing = hf.missing_files(folder)
    if missing:
        src.fail(f"names {folder}, which lacks {', '.join(missing)} (servetool loads a Hugging Face "
                 "folder offline; save one with save_pretrained, tokenizer included)",
                 src.key("transformers"))
    try:
        hf.read_json(folder / "config.json")
    except ValueError as exc:
        src.fail(str(exc), src.key("transformers"))
    return folder


def _transformers_inputs(folder: Path) -> tuple[InputSpec, ...]:
    """input_ids, attention_mask (and token_type_ids where the model has types), one dynamic
    "sequence" axis they share; padded as the tokenizer pads; sample values the model accepts.
    An image model's folder: pixel_values of the size its image processor produces."""
    from servetool.model import hf

    if hf.is_image_folder(folder):
        from servetool.model.image_metadata import folder_input_shape

        shape = folder_input_shape(folder)
        if shape is None:
            raise SpecError(f"{folder / hf.IMAGE_PROCESSOR}: its processor gives no fixed image "
                            "size; add input: {shape: [3, HEIGHT, WIDTH]} to the spec")
        return (InputSpec("pixel_values", shape),)

    config = hf.read_json(folder / "config.json")
    vocab = hf.vocab_size(config) or 2
    pad_id = config.get("pad_token_id")
    ranges = {"input_ids": (0, vocab), "attention_mask": (1, 2), "token_type_ids": (0, 1)}
    pads = {"input_ids": pad_id if isinstance(pad_id, int) else 0}
    return tuple(InputSpec(name, ("sequence",), "int64", pads.get(name, 0), range=ranges[name])
                 for name in hf.input_names(config))


def _parse_text(section: _Reader | None, top: _Reader, task: str, source: Source,
                directory: Path) -> TextOptions:
    from servetool.model import hf

    section = section or _Reader({}, "text", top.file)
    config: dict[str, Any] = {}
    folder = source.path if source.kind == "transformers" else None
    if folder is not None:
        config = hf.read_json(folder / "config.json")
    rel = section.get("tokenizer", str, None)
    if rel:
        tokenizer = _existing_file(section, directory, "tokenizer", rel)
    elif folder is not None:
        tokenizer = folder / hf.TOKENIZER
    else:
        section.fail("is required for a text task whose source is not a Hugging Face folder: the "
                     "tokenizer.json file the model's tokenizer saved", section.key("tokenizer"))
    model_limit = hf.max_length(folder, config) if folder is not None else hf.DEFAULT_MAX_LENGTH
    max_length = section.get("max_length", int, model_limit, check=_positive)
    if max_length > model_limit and folder is not None:
        section.fail(f"is {max_length}, more than the model takes ({model_limit} tokens)",
                     section.key("max_length"))
    declared_pooling, declared_normalize = hf.sentence_pooling(folder) if folder else (None, False)
    pooling = section.get("pooling", str, declared_pooling or "mean", check=_one_of(POOLINGS))
    normalize = section.get("normalize", bool, declared_normalize)
    samples_rel = section.get("samples", str, None)
    samples = _existing_file(section, directory, "samples", samples_rel) if samples_rel else None
    head = _text_head(section, task, config, folder is not None)
    declared = hf.activation_name(config)
    if head == "score" and declared and not hf.score_activation(config) and "score" not in section.data:
        # a Tanh or Softmax CrossEncoder would get another function's scores: never silently
        section.fail(f"is missing: config.json names the CrossEncoder activation {declared}, which "
                     "servetool does not apply; set score: sigmoid or score: raw", section.key("score"))
    options = TextOptions(
        tokenizer=tokenizer, max_length=max_length, truncate=section.get("truncate", bool, True),
        max_texts=section.get("max_texts", int, 32, check=_positive), pooling=pooling,
        normalize=normalize, samples=samples,
        labels=tuple(hf.labels(config) or ()) or None, multi_label=hf.multi_label(config),
        head=head,
        score=section.get("score", str, hf.score_activation(config) or (
            "sigmoid" if head == "score" else "raw"), check=_one_of(SCORE_ACTIVATIONS)),
        threshold=section.get("threshold", (int, float), 0.5, check=lambda v: None if 0 < v < 1
                              else f"must be a probability between 0 and 1, got {v}"),
        aggregation=section.get("aggregation", str, "first", check=_one_of(AGGREGATIONS)),
        pair_truncation=section.get("pair_truncation", str, "longest_first",
                                    check=_one_of(PAIR_TRUNCATIONS)))
    section.get("hidden_states", bool, False)  # read by _refuse_dropped_head
    section.finish()
    if task != "feature-extraction" and ("pooling" in section.data or "normalize" in section.data):
        section.fail(f"sets pooling/normalize, which only feature-extraction uses (task: {task})")
    _refuse_keys_for_other_heads(section, task, head)
    return options


def _text_head(section: _Reader, task: str, config: dict[str, Any], from_folder: bool) -> str:
    """How a classifier's outputs read, from config.json (num_labels, problem_type); a reranker
    needs one output per pair."""
    from servetool.model import hf

    if task not in ("text-classification", "text-reranking"):
        return "classes"
    if not from_folder:  # an ONNX/TorchScript file: no config to read; a reranker gives one score
        return "score" if task == "text-reranking" else "classes"
    head = hf.head_kind(config)
    if task == "text-reranking" and head != "score":
        section.fail(f"text-reranking scores (query, passage) pairs with a one-output head "
                     f"(num_labels 1, as a sentence-transformers CrossEncoder); this folder's "
                     f"head has {hf.num_labels(config)} outputs ({head}): use task: "
                     "text-classification", "task")
    return head


def _refuse_keys_for_other_heads(section: _Reader, task: str, head: str) -> None:
    """A key the model's head or the task never reads is a mistake worth naming."""
    given = set(section.data)
    if "threshold" in given and head != "multi_label":
        section.fail(f"is for multi-label classifiers (config.json problem_type: multi_label_"
                     f"classification); this model's head is {head} (task {task})",
                     section.key("threshold"))
    if "score" in given and head not in ("score", "regression"):
        section.fail(f"is for one-output (score) and regression heads; this model's head is "
                     f"{head} (task {task})", section.key("score"))
    if "aggregation" in given and task != "token-classification":
        section.fail(f"is for token-classification; task is {task}", section.key("aggregation"))
    if "hidden_states" in given and task != "feature-extraction":
        section.fail(f"is for feature-extraction and tensor (serve the hidden states of a folder "
                     f"with a head); task is {task}", section.key("hidden_states"))


def _refuse_dropped_head(top: _Reader, task: str, source: Source) -> None:
    """Serving hidden states (tensor, feature-extraction) from a folder whose weights hold a
    trained head drops that head: refused, naming the task that serves it, unless the spec asks
    for the hidden states explicitly (text.hidden_states: true)."""
    from servetool.model import hf

    if source.kind != "transformers" or task not in ("tensor", "feature-extraction"):
        return
    if _is_image_folder(source):
        return
    fits = hf.head_task(hf.read_json(source.path / "config.json"))
    text = top.data.get("text")
    if fits is None or (isinstance(text, dict) and text.get("hidden_states") is True):
        return
    top.fail(f"is {task}, which serves the encoder's hidden states and drops the trained head of "
             f"{source.path} (config.json architectures: a {fits.replace('-', ' ')} head): use "
             f"task: {fits} (or set text.hidden_states: true to serve the hidden states)", "task")


def _parse_workers(section: _Reader | None) -> tuple[int | None, int | None]:
    """Worker counts, or (None, None) for "auto": decided on the serving machine, not here."""
    if section is None:
        return None, None
    auto_or_count = lambda v: None if v == "auto" or (isinstance(v, int) and v >= 1) else (  # noqa: E731
        f"must be a positive integer or auto, got {v!r}")
    low = section.get("min", (int, str), "auto", check=auto_or_count)
    high = section.get("max", (int, str), low, check=auto_or_count)
    section.finish()
    if (low == "auto") != (high == "auto"):
        section.fail("must be auto for both min and max, or numbers for both", section.key("max"))
    if low == "auto":
        return None, None
    if high < low:
        section.fail(f"max ({high}) is smaller than min ({low})", section.key("max"))
    return low, high


def _parse_export(section: _Reader | None) -> ExportOptions:
    if section is None:
        return ExportOptions()
    result = ExportOptions(
        torchscript_method=section.get("torchscript_method", str, "auto",
                                       check=_one_of(TORCHSCRIPT_METHODS)),
        onnx_simplify=section.get("onnx_simplify", bool, True),
        onnx_opset=section.get("onnx_opset", int, None, check=lambda v: None if 13 <= v <= 23
                               else f"must be an opset from 13 to 23, got {v}"),
    )
    section.finish()
    return result


def _parse_runtime(section: _Reader | None) -> RuntimeOptions:
    if section is None:
        return RuntimeOptions()
    result = RuntimeOptions(
        graph_optimization=section.get("graph_optimization", str, "all",
                                       check=_one_of(GRAPH_OPTIMIZATION)),
        intra_op_threads=section.get("intra_op_threads", int, None, check=_positive),
        inter_op_threads=section.get("inter_op_threads", int, 1, check=_positive),
        optimized_model=section.get("optimized_model", bool, False),
    )
    section.finish()
    return result


def _parse_data(section: _Reader | None, directory: Path, labelled: bool,
                inputs: tuple[InputSpec, ...] = (), detection: bool = False) -> DataRef | None:
    """A data section; a detector's validation may be unlabelled images (the gate then compares
    boxes with the original's), or labelled ones as a COCO file."""
    if section is None:
        return None
    samples = section.get("samples", int, None, check=_positive)
    if "texts" in section.data:
        path = _existing_file(section, directory, "texts", section.get("texts", str))
        section.finish()
        if not labelled:  # a text model's calibration: one text per line, no labels
            ref = DataRef(path, samples, texts=True)
            if not ref.plain_texts():
                section.fail(f"names an empty file: {path}", section.key("texts"))
            return ref
        ref = DataRef(path, samples, texts=True)
        try:
            if not ref.labelled_texts():
                section.fail(f"names an empty file: {path}", section.key("texts"))
        except SpecError as exc:
            section.fail(str(exc), section.key("texts"))
        return ref
    if "coco" in section.data:
        path = _existing_file(section, directory, "coco", section.get("coco", str))
        folder = section.get("images", str, None)
        section.finish()
        ref = DataRef(path, samples, coco=True,
                      image_dir=(directory / folder).resolve() if folder else None)
        from servetool.model.coco_eval import read_coco

        try:
            labelled, _ = read_coco(ref.path, ref.image_dir)
        except (ValueError, KeyError, TypeError) as exc:
            section.fail(f"names {path}, which is not a COCO instances file ({exc!r})",
                         section.key("coco"))
        missing = [t.file for t in labelled if not t.file.is_file()]
        if not labelled or missing:
            section.fail(f"names {path}, whose images are " + (
                f"missing ({missing[0]}, {len(missing)} in all)" if missing else "none"),
                section.key("coco"))
        return ref
    if "images" in section.data:
        folder = (directory / section.get("images", str)).resolve()
        section.finish()
        ref = DataRef(folder, samples, images=True)
        if not folder.is_dir() or not ref.image_files():
            section.fail(f"names no folder of images: {folder}", section.key("images"))
        if labelled and not detection and any(label is None for _, label in ref.image_files()):
            section.fail(f"needs labelled images: put each in a sub-folder named for its label "
                         f"under {folder}", section.key("images"))
        return ref
    path = _existing_file(section, directory, "data", section.get("data", str))
    section.finish()
    try:
        import numpy as np

        with np.load(path) as data:
            files = set(data.files)
    except (OSError, ValueError) as exc:
        section.fail(f"names a file that is not an .npz archive: {path} ({exc})", section.key("data"))
    arrays = {i.name for i in inputs} if len(inputs) > 1 else {"x"}  # several: one per name
    needed = arrays | ({"y"} if labelled else set())
    if not needed <= files:
        section.fail(f"names {path}, which lacks array(s) {', '.join(sorted(needed - files))} "
                     f"(has {', '.join(sorted(files)) or 'none'})", section.key("data"))
    return DataRef(path, samples)


def _is_image_folder(source: Source) -> bool:
    from servetool.model import hf

    return source.kind == "transformers" and hf.is_image_folder(source.path)


def _default_task(source: Source) -> Any:
    """image-classification for a Hugging Face image folder (package prints it); else required."""
    return "image-classification" if _is_image_folder(source) else ...


def _image_config_hints(top: _Reader, source: Source, task: str, hints: Any,
                        shape: tuple) -> None:
    """Merge what a timm or Hugging Face image config says (servetool/model/image_metadata.py) into
    the file's hints; what servetool cannot reproduce is refused unless the spec sets it."""
    from servetool.model.image_metadata import read

    if task != "image-classification":
        return
    found = read(source.kind, source.path)
    if "task" not in top.data and _is_image_folder(source):
        hints.notes.append(f"task: image-classification ({source.path.name} is a Hugging Face "
                           "image model; set task to override)")
    if not found.library:
        return
    given = top.data.get("preprocess") or {}
    for keys, message in found.problems:
        if not all(k in given for k in keys):
            top.fail(message, "preprocess")
    if found.input_shape and tuple(found.input_shape) != tuple(shape):
        top.fail(f"is {list(shape)}, but {found.file} says the model takes "
                 f"{list(found.input_shape)}: fix the input shape or the config", "input.shape")
    hints.preprocess.update(found.preprocess)
    hints.labels = hints.labels or found.labels
    hints.notes.extend(found.notes)


def _file_hints(top: _Reader, source: Source, task: str):
    """What an ONNX image model's own metadata says (servetool/model/exporter_metadata.py); a task
    that contradicts the exporter's is refused rather than served wrong."""
    from servetool.model.exporter_metadata import ULTRALYTICS_TASKS, Hints, onnx_hints

    if source.kind != "onnx" or task not in IMAGE_TASKS:
        return Hints()
    hints = onnx_hints(source.path)
    if hints.task and ULTRALYTICS_TASKS.get(hints.task) != task:
        top.fail(f"is {task}, but {source.path.name} is an {hints.exporter} '{hints.task}' model"
                 + (f" (serve it as task: {ULTRALYTICS_TASKS[hints.task]})"
                    if hints.task in ULTRALYTICS_TASKS else
                    f", whose outputs servetool does not decode (it serves "
                    f"{', '.join(ULTRALYTICS_TASKS)})"), "task")
    return hints


def _parse_detection(section: _Reader | None,
                     found: dict[str, Any] | None = None) -> DetectionOptions:
    """detection: keys over what the model file said (`found`) over servetool's defaults."""
    default = replace(DetectionOptions(), **(found or {}))
    if section is None:
        return default
    share = lambda v: None if 0 <= v <= 1 else f"must be between 0 and 1, got {v}"  # noqa: E731
    number = (int, float)
    result = DetectionOptions(
        layout=section.get("layout", str, default.layout, check=_one_of(DETECTION_LAYOUTS)),
        confidence=float(section.get("confidence", number, default.confidence, check=share)),
        iou=float(section.get("iou", number, default.iou, check=share)),
        max_detections=section.get("max_detections", int, default.max_detections, check=_positive),
        max_candidates=section.get("max_candidates", int, default.max_candidates, check=_positive),
        min_confidence=float(section.get("min_confidence", number, default.min_confidence,
                                         check=share)),
        max_detections_limit=section.get("max_detections_limit", int,
                                         default.max_detections_limit, check=_positive),
        scale=float(section.get("scale", number, default.scale,
                                check=lambda v: None if v > 0 else f"must be > 0, got {v}")),
        box_format=section.get("box_format", str, default.box_format, check=_one_of(BOX_FORMATS)),
        box_units=section.get("box_units", str, default.box_units, check=_one_of(BOX_UNITS)),
        fit=section.get("fit", str, default.fit, check=_one_of(FITS)),
        stride=section.get("stride", int, default.stride, check=_positive),
    )
    section.finish()
    if result.max_detections > result.max_detections_limit:
        section.fail(f"is {result.max_detections}, over max_detections_limit "
                     f"({result.max_detections_limit})", section.key("max_detections"))
    if result.confidence < result.min_confidence:
        section.fail(f"is {result.confidence}, under min_confidence ({result.min_confidence})",
                     section.key("confidence"))
    return result


def _parse_tolerance(section: _Reader | None) -> Tolerance:
    if section is None:
        return Tolerance()
    non_negative = lambda v: None if v >= 0 else f"must be >= 0, got {v}"  # noqa: E731
    share = lambda v: None if 0 <= v <= 1 else f"must be between 0 and 1, got {v}"  # noqa: E731
    result = Tolerance(
        atol=section.get("atol", (int, float), None, check=non_negative),
        rtol=section.get("rtol", (int, float), None, check=non_negative),
        min_top1_agreement=section.get("min_top1_agreement", (int, float), None, check=share),
        max_accuracy_drop=section.get("max_accuracy_drop", (int, float), None, check=non_negative),
        min_cosine=section.get("min_cosine", (int, float), None, check=share),
        max_map_drop=section.get("max_map_drop", (int, float), None, check=non_negative),
        min_box_match=section.get("min_box_match", (int, float), None, check=share),
    )
    section.finish()
    return result


def _parse_compress(section: _Reader | None, directory: Path,
                    inputs: tuple[InputSpec, ...]) -> CompressOptions | None:
    """`compress:` (servetool compress): prune or a student, distillation, the gate's bound."""
    if section is None:
        return None
    prune = _parse_prune(section.child("prune", None))
    distill = _parse_distill(section.child("distill", None), directory, inputs)
    student = _parse_student(section.child("student", None), directory)
    result = CompressOptions(
        prune=prune, distill=distill, student=student,
        max_accuracy_drop=float(section.get("max_accuracy_drop", (int, float), 1.0,
                                            check=lambda v: None if v >= 0 else
                                            f"must be >= 0 (top-1 points), got {v}")),
        int8=section.get("int8", bool, False),
        formats=tuple(section.get("formats", list, ["onnx", "torchscript"],
                                  check=_compress_formats)))
    section.finish()
    if prune is None and student is None:
        section.fail("needs prune (channels removed from the original) or student (a smaller "
                     "model class distilled from it)")
    if prune is not None and student is not None:
        section.fail("gives both prune and student: pruning makes the smaller model from the "
                     "original, a student is one you give; choose one", section.key("student"))
    if distill is None and (student is not None or prune.importance == "taylor"):
        what = "a student learns" if student is not None else "taylor importance is measured"
        section.fail(f"is required: {what} on training data (distill.train: {{images: FOLDER}} "
                     "with one sub-folder per label, or {data: FILE.npz} with x and y)",
                     section.key("distill"))
    return result


def _compress_formats(value: list) -> str | None:
    """Formats a step's model is measured in: full-precision ones (int8 is its own row)."""
    from servetool.model.formats import FORMATS

    full = [n for n, f in FORMATS.items() if f.precision == "fp32"]
    wrong = [v for v in value if v not in full]
    if not value or wrong or len(set(value)) != len(value):
        return (f"must list distinct full-precision formats of {', '.join(full)} (int8 is "
                f"compress.int8's row); got {value!r}")
    return None


def _parse_prune(section: _Reader | None) -> PruneOptions | None:
    if section is None:
        return None
    given = [k for k in PRUNE_TARGETS if section.data.get(k) is not None]
    if len(given) != 1:
        section.fail(f"must give exactly one target of {', '.join(PRUNE_TARGETS)} "
                     f"(e.g. speedup: 2.0); got {', '.join(given) or 'none'}")
    target = given[0]
    share = lambda v: None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v}"  # noqa: E731
    check = (lambda v: None if v > 1 else f"must be > 1 (original MACs / pruned), got {v}") \
        if target == "speedup" else share
    keep = section.get("keep", list, None, check=lambda v: None if all(
        isinstance(n, str) and n for n in v) else f"must be a list of module names, got {v!r}")
    result = PruneOptions(
        target=target, value=float(section.get(target, (int, float), check=check)),
        importance=section.get("importance", str, "l1", check=_one_of(IMPORTANCES)),
        keep=tuple(keep) if keep is not None else None,
        round_to=section.get("round_to", int, 8, check=_positive),
        steps=section.get("steps", int, 1, check=_positive),
        max_layer_ratio=float(section.get("max_layer_ratio", (int, float), 0.9, check=share)))
    for other in PRUNE_TARGETS:
        section.seen.add(other)
    section.finish()
    return result


def _parse_distill(section: _Reader | None, directory: Path,
                   inputs: tuple[InputSpec, ...]) -> DistillOptions | None:
    if section is None:
        return None
    if section.data.get("train") is None:
        section.fail("is required: the training data (an image folder with one sub-folder per "
                     "label: {images: FOLDER}; or {data: FILE.npz} with x, and y for labels)",
                     section.key("train"))
    train_section = section.child("train")
    problem = None
    try:
        train = _parse_data(train_section, directory, False, inputs)
    except SpecError as exc:
        if not _missing_path(train_section, directory):
            raise
        train, problem = None, str(exc)
    if train is not None and (train.texts or train.coco):
        section.fail("takes images ({images: FOLDER}) or an .npz ({data: FILE}) for an image "
                     "classifier", section.key("train"))
    positive = lambda v: None if v > 0 else f"must be > 0, got {v}"  # noqa: E731
    result = DistillOptions(
        train=train,
        epochs=section.get("epochs", int, 10, check=_positive),
        lr=float(section.get("lr", (int, float), 1e-3, check=positive)),
        batch=section.get("batch", int, 64, check=_positive),
        temperature=float(section.get("temperature", (int, float), 4.0, check=positive)),
        alpha=float(section.get("alpha", (int, float), 0.5, check=lambda v: None if 0 <= v <= 1
                                else f"must be between 0 and 1, got {v}")),
        max_minutes=section.get("max_minutes", (int, float), None, check=positive),
        patience=section.get("patience", int, 3, check=_positive),
        holdout=float(section.get("holdout", (int, float), 0.1, check=lambda v: None
                                  if 0 < v <= 0.5 else f"must be in (0, 0.5], got {v}")),
        step_epochs=section.get("step_epochs", int, 1, check=_non_negative),
        seed=section.get("seed", int, 0), train_problem=problem)
    section.finish()
    return result


def _missing_path(section: _Reader, directory: Path) -> bool:
    """compress.distill.train names a file or folder that is not there (yet)."""
    rel = section.data.get("data") or section.data.get("images")
    return isinstance(rel, str) and not (directory / rel).exists()


def _parse_student(section: _Reader | None, directory: Path) -> StudentOptions | None:
    if section is None:
        return None
    weights = section.get("state_dict", str, None)
    result = StudentOptions(
        model_file=_existing_file(section, directory, "model_file",
                                  section.get("model_file", str)),
        class_name=section.get("class", str, check=lambda v: None if v.isidentifier() else
                               f"must be a Python class name, got {v!r}"),
        init_args=section.get("init_args", dict, {}),
        state_dict=_existing_file(section, directory, "state_dict", weights) if weights else None)
    section.finish()
    return result


def _parse_preprocess(pre: _Reader | None, spec_file: Path) -> Preprocess:
    if pre is None:
        return Preprocess()
    resize = pre.get("resize", (int, list), None, check=_size)
    crop = pre.get("center_crop", (int, list), None, check=_size)
    crop = [crop, crop] if isinstance(crop, int) else crop  # torchvision's CenterCrop(int)
    # letterbox: true, or {fill: 114}: the image fitted inside the input size, aspect kept
    letterbox = pre.get("letterbox", (bool, dict), None)
    letterbox_opts: dict[str, Any] | None = None
    if isinstance(letterbox, dict):
        section = pre.child("letterbox")
        letterbox_opts = {"fill": section.get("fill", int, 114, check=_byte)}
        section.finish()
    elif letterbox:
        letterbox_opts = {"fill": 114}
    if letterbox_opts and (resize or crop):
        pre.fail("fits the image inside the model's input by itself: drop resize and "
                 "center_crop", pre.key("letterbox"))
    mean = pre.get("mean", list, None, check=_number_list)
    std = pre.get("std", list, None, check=_number_list)
    if std is not None and any(v == 0 for v in std):
        pre.fail("must not contain 0", pre.key("std"))
    result = Preprocess(
        grayscale=pre.get("grayscale", bool, False),
        resize=tuple(resize) if isinstance(resize, list) else resize,
        interpolation=pre.get("interpolation", str, "bilinear", check=_one_of(INTERPOLATIONS)),
        center_crop=tuple(crop) if crop else None,
        crop_offsets=pre.get("crop_offsets", str, "round", check=_one_of(CROP_OFFSETS)),
        letterbox=letterbox_opts,
        jpeg_draft=pre.get("jpeg_draft", bool, False),
        invert=pre.get("invert", bool, False),
        mean=tuple(float(v) for v in mean) if mean else None,
        std=tuple(float(v) for v in std) if std else None,
        max_pixels=pre.get("max_pixels", int, None, check=_positive),
        formats=_parse_formats(pre),
    )
    pre.finish()
    return result


def _check_geometry(top: _Reader, pre: Preprocess, height: int, width: int) -> None:
    """The image must come out of preprocessing at the model's input size, for every image."""
    if pre.center_crop and tuple(pre.center_crop) != (height, width):
        top.fail(f"is {list(pre.center_crop)}, but input.shape takes {height}x{width} images "
                 f"([height, width] = [{height}, {width}])", "preprocess.center_crop")
    if pre.center_crop or pre.letterbox:
        return
    if isinstance(pre.resize, int):
        top.fail(f"is {pre.resize}: the shorter side, aspect kept, so images of other shapes come "
                 f"out in other sizes; add center_crop: [{height}, {width}] (torchvision's "
                 f"Resize({pre.resize}) + CenterCrop), or give resize as [{height}, {width}]",
                 "preprocess.resize")
    if pre.resize and tuple(pre.resize) != (height, width):
        top.fail(f"is {list(pre.resize)}, but input.shape takes [{height}, {width}]; add a "
                 "center_crop of that size, or resize to it", "preprocess.resize")


def _parse_formats(pre: _Reader) -> tuple[str, ...] | None:
    from handlers.imaging import known_formats

    formats = pre.get("formats", list, None)
    if formats is None:
        return None
    known = known_formats()
    names = [str(f).upper() for f in formats]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        pre.fail(f"must list image formats Pillow decodes (e.g. JPEG, PNG, WEBP); unknown: "
                 f"{', '.join(unknown) or '(empty list)'}", pre.key("formats"))
    return tuple(names)


def find_specs(paths: list[str] | tuple[str, ...], models_root: Path) -> list[ModelSpec]:
    """The specs named on the command line, or every model under models_root."""
    if paths:
        return [load_spec(p) for p in paths]
    found = sorted(models_root.glob(f"*/{SPEC_FILE}"))
    if not found:
        raise SpecError(f"no {SPEC_FILE} found under {models_root}")
    return [load_spec(p) for p in found]
