"""The format part of the handler: load one serialized model and run a batch through it.

Each runtime takes the feeds of a batch ({input name: array}, or one array for a one-input model)
and returns a list of numpy outputs, so a task never needs to know which format it runs on.
`output_axes` names each output's axes where the model file does (ONNX dim_params), which lets the
handler crop padded dynamic axes per request (handlers/batching.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from handlers.batching import as_feeds, batch_size, take


class Runtime(Protocol):
    input_names: list[str]
    output_names: list[str]
    output_axes: list[list[object]] | None
    metadata: dict[str, str]  # what the model file says about itself (ONNX metadata_props)

    def run(self, batch: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]: ...


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may really use: SERVETOOL_CPUS when set (Kubernetes pods get their CPU
    request there through the Downward API), else a cgroup v2 CPU quota (a container's --cpus or CPU
    limit), else the CPU affinity. A container sees every core of its node otherwise, and one worker
    per node core would oversubscribe a pod that asked for one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    declared = os.environ.get("SERVETOOL_CPUS", "").strip()
    if declared:
        try:
            return max(1, min(cores, int(float(declared))))
        except ValueError:
            pass
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, min(cores, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def threads_per_worker(max_workers: int | None, cores: int | None = None) -> int:
    """Intra-op threads for one worker so that all workers together do not oversubscribe the cores.

    Oversubscription (every worker using every core) costs far more than idle cores on a busy server.
    With no maxWorkers ("auto"), servetool runs one worker per core, each with one thread.
    """
    cores = cores or available_cores()
    return max(1, cores // max(1, max_workers or cores))


def fixed_batch(leading_dims: list[object]) -> int | None:
    """The batch the model file fixes, from its inputs' first axes (ONNX Runtime gives an int for a
    fixed axis, a name or None for a dynamic one); None when the batch is dynamic. Exporters fix it
    by default more often than not (ultralytics, torch.onnx.export without dynamic axes)."""
    sizes = [d for d in leading_dims if isinstance(d, int) and not isinstance(d, bool) and d > 0]
    return sizes[0] if sizes else None


def run_in_chunks(run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                  feeds: dict[str, np.ndarray], size: int) -> list[np.ndarray]:
    """run() on a batch of any length for a model that takes exactly `size` rows at a time: chunks
    of `size`, the last one padded with copies of its own last row (real values, so a padding row
    cannot make the model raise or give NaN the way zeros could: an all-zero attention mask, an
    index out of range), and the padding's outputs dropped. Rows must not see each other in the
    model, as in any batched model (a dynamic int8 model's per-tensor scale is the exception:
    copies of a real row leave its range unchanged)."""
    total = batch_size(feeds)
    if total in (0, size):  # 0: the model's own error, never an empty answer
        return run(feeds)
    parts: list[list[np.ndarray]] = []
    for start in range(0, total, size):
        chunk = take(feeds, start, start + size)
        real = batch_size(chunk)
        if real < size:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], size - real, axis=0)])
                     for k, v in chunk.items()}
        outs = run(chunk)
        for i, out in enumerate(outs):
            if np.ndim(out) == 0 or len(out) != size:
                raise ValueError(f"output {i} has shape {list(np.shape(out))}: its first axis is "
                                 f"not the model's fixed batch of {size}, so a batch of {total} "
                                 f"cannot run in chunks of {size}")
        parts.append([np.asarray(out)[:real] for out in outs])
    return [np.concatenate(rows) for rows in zip(*parts, strict=True)]


def _torch_threads(torch, threads: int) -> None:
    """PyTorch's intra-op threads for this worker, and one inter-op thread."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process, before any parallel work
        pass


class TorchScriptRuntime:
    metadata: dict[str, str] = {}

    def __init__(self, path: str, threads: int, options: dict | None = None) -> None:
        import torch

        _torch_threads(torch, threads)
        self._torch = torch
        self.module = torch.jit.load(path, map_location="cpu").eval()
        self.input_names = list((options or {}).get("input_names") or ["input"])
        self.output_names = ["output"]
        self.output_axes = None

    def run(self, batch: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = as_feeds(batch, self.input_names)
        with self._torch.inference_mode():
            out = self.module(*(self._torch.from_numpy(feeds[n]) for n in self.input_names))
        if isinstance(out, dict):
            self.output_names = list(out)
            out = list(out.values())
        if isinstance(out, (list, tuple)):
            if len(self.output_names) != len(out):
                self.output_names = [f"output_{i}" for i in range(len(out))]
            return [o.numpy() for o in out]
        return [out.numpy()]


class OnnxRuntime:
    LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

    def __init__(self, path: str, threads: int, options: dict | None = None) -> None:
        import onnxruntime as ort

        options = options or {}
        level = options.get("graph_optimization") or "all"
        optimized = options.get("optimized_model_file")
        if optimized and os.path.exists(os.path.join(os.path.dirname(path), optimized)):
            # already optimised offline: skip the work at every worker start
            path, level = os.path.join(os.path.dirname(path), optimized), "disabled"
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = int(options.get("inter_op_threads") or 1)
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                           self.LEVELS[level])
        self.session = ort.InferenceSession(path, session_options,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_axes = [list(o.shape) for o in self.session.get_outputs()]
        # A fixed batch axis: every batch (the gate's, TorchServe's) runs in chunks of that size
        self.fixed_batch = fixed_batch([i.shape[0] if i.shape else None
                                        for i in self.session.get_inputs()])
        custom = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k.removeprefix("servetool."): v for k, v in custom.items()
                         if k.startswith("servetool.")}

    def run(self, batch: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = as_feeds(batch, self.input_names)
        if self.fixed_batch is None:
            return self.session.run(None, feeds)
        return run_in_chunks(lambda chunk: self.session.run(None, chunk), feeds, self.fixed_batch)


class OpenVINORuntime:
    metadata: dict[str, str] = {}

    def __init__(self, path: str, threads: int, options: dict | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        # The CPU plugin runs bf16 on CPUs that have it unless told otherwise: fp32 means fp32.
        precision = (options or {}).get("inference_precision") or "f32"
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision})
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() if i.get_names() else f"input_{n}"
                            for n, i in enumerate(self.compiled.inputs)]
        self.output_names = [o.get_any_name() if o.get_names() else f"output_{i}"
                             for i, o in enumerate(self.compiled.outputs)]
        self.output_axes = None
        # An IR converted from a fixed-batch ONNX model keeps its batch: chunked as ONNX Runtime's
        self.fixed_batch = fixed_batch([
            s[0].get_length() if s.rank.is_static and len(s) and s[0].is_static else None
            for s in (i.get_partial_shape() for i in self.compiled.inputs)])

    def run(self, batch: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = as_feeds(batch, self.input_names)
        if self.fixed_batch is not None:
            return run_in_chunks(self._infer, feeds, self.fixed_batch)
        return self._infer(feeds)

    def _infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer({i: feeds[n] for i, n in enumerate(self.input_names)})
        return [np.asarray(results[o]) for o in self.compiled.outputs]


class TensorRTRuntime:
    """TorchScript with embedded TensorRT engines, run on the GPU."""

    metadata: dict[str, str] = {}

    def __init__(self, path: str, threads: int, options: dict | None = None) -> None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("this archive is in a tensorrt format, which runs on an NVIDIA GPU "
                               "with CUDA; this worker sees none (torch.cuda.is_available() is "
                               "False). Package the model as onnx for CPU serving.")
        try:
            import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops)
        except ImportError:
            raise RuntimeError("this archive is in a tensorrt format, which needs the "
                               "torch_tensorrt package in TorchServe's Python environment") from None
        self._torch = torch
        self.module = torch.jit.load(path, map_location="cuda").eval()
        self.input_names = list((options or {}).get("input_names") or ["input"])
        self.output_names = ["output"]
        self.output_axes = None

    def run(self, batch: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = as_feeds(batch, self.input_names)
        with self._torch.inference_mode():
            out = self.module(*(self._torch.from_numpy(feeds[n]).cuda() for n in self.input_names))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in outs]


def load_program(path: str):
    """A torch.export program, opened as a file: torch.export.load takes a path for the current
    archive format only when its name ends in .pt2 (a model.pt from a user is one too)."""
    import torch

    with open(path, "rb") as f:
        return torch.export.load(f)


def program_inputs(program) -> list[tuple[str, list[int | str], object]]:
    """A program's user inputs in call order: (name, shape with the batch axis, torch dtype), a
    dynamic axis as its symbol's name (s0, s77...: the same name on two inputs is one length, and
    the ONNX exported from the program names the axis so too). A non-tensor input has no shape."""
    users = set(program.graph_signature.user_inputs)
    found = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in users:
            value = node.meta.get("val")
            shape = [d if isinstance(d, int) else str(d) for d in getattr(value, "shape", ())]
            found.append((node.name, shape if hasattr(value, "shape") else None,
                          getattr(value, "dtype", None)))
    return found


def program_batch(program) -> tuple[int, int | None]:
    """The fewest and most rows one call of the program takes (most None: no bound), from its
    first input's first axis: a fixed axis (an example of batch 1 specialises it) is (n, n); a
    dynamic one is its range, where a least of 2 stands for 1 (torch.export's 0/1 specialisation
    gives Dim.AUTO and Dim('batch') the range [2, ...], and such a program runs a batch of 1)."""
    users = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        shape = getattr(node.meta.get("val"), "shape", None)
        if node.op != "placeholder" or node.name not in users or not shape:
            continue
        first = shape[0]
        if isinstance(first, int):
            return first, first
        bounds = program.range_constraints.get(first.node.expr)
        if bounds is None:
            return 1, None
        least = int(bounds.lower) if bounds.lower > 2 else 1
        return least, int(bounds.upper) if bounds.upper < 2**62 else None  # int_oo: no bound
    return 1, None


def rows_per_call(total: int, least: int, most: int | None) -> int | None:
    """The chunk size a batch of `total` rows must run in (run_in_chunks) for a model that takes
    least..most rows a call, or None when it runs whole."""
    if total < least:
        return least  # one call, padded with copies of the last row
    if most is not None and total > most:
        return most
    return None


class ExportedProgramRuntime:
    """A torch.export program (.pt2) run by PyTorch: its module, called eagerly op by op."""

    metadata: dict[str, str] = {}

    def __init__(self, path: str, threads: int, options: dict | None = None) -> None:
        import torch
        from torch.utils import _pytree

        _torch_threads(torch, threads)
        self._torch, self._leaves = torch, _pytree.tree_leaves
        options = options or {}
        program = load_program(path)
        self.module = program.module()  # no .eval(): the program is already in inference form
        self.input_names = list(options.get("input_names") or program.graph_signature.user_inputs)
        count = len(program.graph_signature.user_outputs)
        self.output_names = list(options.get("output_names") or (
            ["output"] if count == 1 else [f"output_{i}" for i in range(count)]))
        self.output_axes = None
        self.least, self.most = program_batch(program)
        self.fixed_batch = self.least if self.least == self.most else None

    def run(self, batch: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = as_feeds(batch, self.input_names)
        size = rows_per_call(batch_size(feeds), self.least, self.most)
        return self._infer(feeds) if size is None else run_in_chunks(self._infer, feeds, size)

    def _infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n]))
                                for n in self.input_names))
        return [o.numpy() for o in self._leaves(out)]  # a dict's values, a tuple's items, in order


RUNTIMES = {"torchscript": TorchScriptRuntime, "onnx": OnnxRuntime, "openvino": OpenVINORuntime,
            "tensorrt": TensorRTRuntime, "exported-program": ExportedProgramRuntime}


def load_runtime(runtime: str, path: str, threads: int, options: dict | None = None) -> Runtime:
    try:
        runtime_class = RUNTIMES[runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}") from None
    return runtime_class(path, threads, options)
