"""The format part of the handler: load one serialized model and run a batch through it.

Each runtime takes a numpy batch and returns a list of numpy outputs, so a task never needs to know
which format it runs on.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np


class Runtime(Protocol):
    output_names: list[str]

    def run(self, batch: np.ndarray) -> list[np.ndarray]: ...


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(max_workers: int, cores: int | None = None) -> int:
    """Intra-op threads for one worker so that all workers together do not oversubscribe the cores.

    Oversubscription (every worker using every core) costs far more than idle cores on a busy server.
    """
    cores = cores or available_cores()
    return max(1, cores // max(1, max_workers))


class TorchScriptRuntime:
    def __init__(self, path: str, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # can only be set once per process, before any parallel work
            pass
        self._torch = torch
        self.module = torch.jit.load(path, map_location="cpu").eval()
        self.output_names = ["output"]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        with self._torch.inference_mode():
            out = self.module(self._torch.from_numpy(batch))
        if isinstance(out, dict):
            self.output_names = list(out)
            out = list(out.values())
        if isinstance(out, (list, tuple)):
            if len(self.output_names) != len(out):
                self.output_names = [f"output_{i}" for i in range(len(out))]
            return [o.numpy() for o in out]
        return [out.numpy()]


class OnnxRuntime:
    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: batch})


RUNTIMES = {"torchscript": TorchScriptRuntime, "onnx": OnnxRuntime}


def load_runtime(fmt: str, path: str, threads: int) -> Runtime:
    try:
        runtime_class = RUNTIMES[fmt]
    except KeyError:
        raise ValueError(f"unknown serving format {fmt!r}; known: {', '.join(RUNTIMES)}") from None
    return runtime_class(path, threads)
