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


class TorchScriptRuntime:
    metadata: dict[str, str] = {}

    def __init__(self, path: str, threads: int, options: dict | None = None) -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # can only be set once per process, before any parallel work
            pass
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


RUNTIMES = {"torchscript": TorchScriptRuntime, "onnx": OnnxRuntime, "openvino": OpenVINORuntime,
            "tensorrt": TensorRTRuntime}


def load_runtime(runtime: str, path: str, threads: int, options: dict | None = None) -> Runtime:
    try:
        runtime_class = RUNTIMES[runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}") from None
    return runtime_class(path, threads, options)
