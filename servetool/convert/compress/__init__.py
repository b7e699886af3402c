"""`servetool compress`: a smaller version of a model, made by structured pruning (torch-pruning)
or a student the user gives, recovered by knowledge distillation from the original, saved as a
new servetool model folder (a torch.export program and a derived spec), gated against the
original's top-1 accuracy and measured step by step.

One module per job: data (training and validation sets through the spec's loaders), models (the
teacher, the prunable module, the student), graph (a program's graph as layers), prune, distill,
checkpoint, save (the new folder), gate and report. `compress(spec, ...)` runs them in order.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servetool.convert import export
from servetool.convert.compress import (
    checkpoint,
    data,
    distill,
    gate,
    metric,
    models,
    prune,
    report,
    save,
)
from servetool.convert.compress.common import SUPPORTED_TASKS, CompressError, Progress, quiet
from servetool.model.spec import VERSION_RE, CompressOptions, ModelSpec

__all__ = ["CompressError", "compress", "default_out"]


def default_out(spec: ModelSpec) -> Path:
    return spec.directory.parent / f"{spec.directory.name}-compressed"


def compress(spec: ModelSpec, out: Path | None = None, *, version: str | None = None,
             accept: bool = False, latency_seconds: float = 3.0, threads: int | None = None,
             progress: Progress = quiet) -> dict[str, Any]:
    """Compress `spec`'s model into the folder `out` (a new version of the same model); returns
    the report. Raises CompressError on bad input, and when the compression gate refuses."""
    options = _require(spec)
    out = Path(out) if out is not None else default_out(spec)
    version = version or save.next_version(spec.version)
    if not VERSION_RE.match(version):
        raise CompressError(f"--version {version!r} is not a version like 1.1 or 2")
    if version == spec.version:
        raise CompressError(f"--version {version} is the original's own: the compressed model is "
                            "a new version of it (versions are immutable once served)")
    save.check_out(spec, out)
    if options.prune is not None:
        models.require_prunable(spec)
    before = torch.get_num_threads()
    if threads:  # PyTorch's training threads too (restored after)
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix=f"servetool-compress-{spec.name}-") as tmp:
            return Run(spec, options, out, Path(tmp), progress).go(version, accept,
                                                                   latency_seconds, threads)
    finally:
        torch.set_num_threads(before)


def _require(spec: ModelSpec) -> CompressOptions:
    if spec.task not in SUPPORTED_TASKS:
        raise CompressError(f"{spec.spec_file}: compress supports task {', '.join(SUPPORTED_TASKS)} "
                            "(its gate is top-1, or cosine to the original's outputs); this "
                            f"model's task is {spec.task}, whose gate (mAP, or text) it has not")
    if spec.compress is None:
        raise CompressError(f"{spec.spec_file}: has no compress: section; add e.g. compress: "
                            "{prune: {speedup: 2}, distill: {train: {images: FOLDER}}}")
    distil = spec.compress.distill
    if distil is not None and distil.train is None:
        raise CompressError(distil.train_problem or "compress.distill.train is missing")
    return spec.compress


class Run:
    """One compression, resumable: its state is what checkpoint.py saves."""

    def __init__(self, spec: ModelSpec, options: CompressOptions, out: Path, tmp: Path,
                 progress: Progress) -> None:
        self.spec, self.options, self.out, self.tmp = spec, options, out, tmp
        self.say = lambda message: progress(f"{spec.name}: {message}")
        self.progress = progress
        self.example = torch.from_numpy(export.example_batch(spec, 1))
        self.samples = self.teacher_logits = self.data = None
        self.deadline = None

    # --- the steps, in order -----------------------------------------------------------------
    def go(self, version: str, accept: bool, latency_seconds: float,
           threads: int | None) -> dict[str, Any]:
        started = time.monotonic()
        self.say(f"loading the original ({self.spec.source.kind}) and the validation set")
        self.original = export.load_original(self.spec)
        self._validation()
        self.bench = self._bench(latency_seconds, threads)
        key = checkpoint.fingerprint(self.spec)
        self.state = checkpoint.load(self.out, key, self.progress) or {
            "fingerprint": key, "histories": [], "model": None, "loops": {}, "rows": []}
        self._load_training_data()
        model = self._model()
        if not self.state["rows"]:
            self._original_row()
        if self.options.prune is not None:
            model = self._prune_steps(model)
        if self.options.distill is not None:
            model = self._train(model, "distil", self.options.distill.epochs)
        model.eval()
        self._check_outputs(model, "the compressed model")
        return self._finish(model, version, accept, time.monotonic() - started)

    def _load_training_data(self) -> None:
        distil = self.options.distill
        if distil is None:
            return
        self.say(f"reading the training data {distil.train.path}")
        samples = data.training_set(self.spec, distil.train)
        self.say(f"the original's outputs for {samples.count} training examples")
        self.data = data.split(samples, _teacher_logits(self.original, samples), distil.holdout,
                               distil.seed, self.metric)
        self.samples, self.teacher_logits = self.data.train, self.data.teacher
        self.early_stop_reference = self.metric.score(
            models.logits(self.original, self.data.early_stop[0]), self.data.early_stop[1])
        against = "labels" if self.data.labelled else "the original's answers"
        self.say(f"{len(self.data.early_stop[1])} of them held out for early stopping ("
                 f"{self.metric.name} against {against}: the original scores "
                 f"{self.early_stop_reference:.2%})")

    def _validation(self) -> None:
        """The validation inputs and what the task's metric scores them against: labels (top-1),
        or the original's own outputs (cosine)."""
        x, y = data.validation_set(self.spec)
        outputs = models.logits(self.original, x)
        self.metric = metric.for_task(self.spec.task, y is not None, outputs.shape)
        if self.metric.name == metric.TOP1:
            self.validation = (x, data.require_labels(self.spec, y))
        else:
            self.validation = (x, outputs)
        self.original_outputs = outputs.shape[1:]

    def score(self, model: torch.nn.Module, x: np.ndarray, target: np.ndarray) -> float:
        return distill.score(model, x, target, self.metric)

    def _check_outputs(self, model: torch.nn.Module, what: str) -> None:
        if self.metric.name == metric.TOP1:
            models.check_classes(self.spec, model, what)
        else:
            models.check_shape(self.spec, model, what, self.original_outputs)

    def _model(self) -> torch.nn.Module:
        """The model being compressed, as the checkpoint left it (or as it starts)."""
        if self.options.student is not None:
            model = models.student(self.spec, self.options.student)
        else:
            model = models.prunable(self.spec)
            self.base = prune.count(model, self.example)
            self.base_channels = prune.channels(model)
            self.keep = prune.keep_names(model, self.options.prune)
            model = prune.replay(model, self.example, self.state["histories"])
        if self.state["model"] is not None:
            model.load_state_dict(self.state["model"])
        return model

    def _original_row(self) -> None:
        self.say("measuring the original")
        accuracy = self.metric.score(models.logits(self.original, self.validation[0]),
                                     self.validation[1])
        skipped: dict[str, str] = {}
        artifacts = report.exports(self.original, self.spec, self.tmp / "original",
                                   self.bench.formats, skipped)
        if not artifacts:
            raise CompressError("the original exports to none of compress.formats: "
                                + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        counts = self.base if self.options.prune is not None else _counts(self.original,
                                                                          self.example)
        self.state["rows"].append(report.row(
            "original", accuracy=accuracy, counts=counts,
            size=next(iter(artifacts.values())).size_bytes,
            timing=report.timing(artifacts, self.spec, self.bench),
            note="; ".join(f"no {k}: {v}" for k, v in skipped.items())))

    def _prune_steps(self, model: torch.nn.Module) -> torch.nn.Module:
        options = self.options.prune
        gradients = None
        if options.importance == "taylor":
            gradients = distill.gradients_for_taylor(self.samples, self.teacher_logits,
                                                     self.options.distill, self.metric)
        goals = prune.step_goals(options)
        for number, goal in enumerate(goals, 1):
            label = f"prune {number}/{len(goals)}"
            if number > len(self.state["histories"]):
                self.say(f"{label}: searching the channel ratio that leaves {goal:.3f} of the "
                         f"original's {'parameters' if options.target == 'params_ratio' else 'MACs'}")
                pruned = prune.prune_to(model, self.example, options, self.keep, goal, self.base,
                                        gradients)
                model = pruned.model
                self._check_outputs(model, f"the model after {label} (add the layer that gives "
                                    "the outputs to compress.prune.keep)")
                self.state["histories"].append(pruned.history)
                self._step_row(label, model, (pruned.macs, pruned.params),
                               f"{prune.channels(model) / self.base_channels:.0%} of the "
                               "channels left")
            if number < len(goals):
                model = self._recover(model, label)
        return model

    def _step_row(self, label: str, model: torch.nn.Module, counts: tuple[int, int],
                  note: str) -> None:
        accuracy = self.score(model, *self.validation)
        artifacts = self._step_exports(model, self.spec, label)
        self.state["rows"].append(report.row(label, accuracy=accuracy, counts=counts,
                                             size=next(iter(artifacts.values())).size_bytes,
                                             timing=report.timing(artifacts, self.spec, self.bench),
                                             note=note))
        self.say(f"{label}: {counts[0] / self.base[0]:.3f} of the MACs, "
                 f"{counts[1] / self.base[1]:.3f} of the parameters; validation "
                 f"{self.metric.name} "
                 f"{accuracy:.2%}")
        self._save(model)

    def _step_exports(self, model: torch.nn.Module, spec: ModelSpec, label: str,
                      formats: tuple[str, ...] | None = None) -> dict[str, Any]:
        folder = self.tmp / label.replace(" ", "-").replace("/", "-")
        return report.exports(model.eval(), report.module_spec(spec), folder,
                              formats or self.bench.formats)

    def _recover(self, model: torch.nn.Module, label: str) -> torch.nn.Module:
        """Distillation between pruning steps, when this step lost more than the gate allows."""
        distil = self.options.distill
        stage = f"recover {label.split()[1]}"
        if distil is None or not distil.step_epochs:
            return model
        row = next(r for r in self.state["rows"] if r["step"] == label)
        lost = (self.early_stop_reference - self.score(model, *self.data.early_stop)) * 100
        if stage not in self.state["loops"] and lost <= self.options.max_accuracy_drop:
            return model
        model = self._train(model, stage, distil.step_epochs)
        loop = self.state["loops"][stage]
        row["recovered_accuracy"] = self.score(model, *self.validation)
        row["note"] = (row["note"].split("; recovered")[0] + f"; recovered to "
                       f"{row['recovered_accuracy']:.2%} in {loop['epochs_done']} epoch(s)")
        return model

    def _train(self, model: torch.nn.Module, stage: str, epochs: int) -> torch.nn.Module:
        saved = self.state["loops"].get(stage)
        loop = distill.Loop(**{**saved, "epochs": epochs}) if saved else distill.Loop(stage, epochs)
        if loop.complete:
            return model
        self.say(f"{stage}: distilling from the original on {self.samples.count} examples "
                 f"(from epoch {loop.epochs_done + 1} of {epochs})")
        minutes = self.options.distill.max_minutes
        if minutes and self.deadline is None:  # the budget counts training, not the rest
            self.deadline = time.monotonic() + minutes * 60

        def save_loop(current: distill.Loop) -> None:
            self.state["loops"][stage] = current.state()
            self._save(model)

        distill.train(model, self.samples, self.teacher_logits, self.data.early_stop,
                      self.options.distill, loop, save=save_loop, metric=self.metric,
                      deadline=self.deadline, progress=self.say)
        if loop.complete:  # its best weights are the model's now; its optimizer is done
            self.state["loops"][stage] = {**loop.state(), "best": None, "optimizer": None}
        self._save(model)  # the best weights, which train() left on the model
        return model

    def _save(self, model: torch.nn.Module) -> None:
        self.state["model"] = model.state_dict()
        checkpoint.save(self.out, self.state)

    # --- the result ------------------------------------------------------------------------------
    def _finish(self, model: torch.nn.Module, version: str, accept: bool,
                seconds: float) -> dict[str, Any]:
        """Save the new folder, gate and measure it, write the report. A refused or failed
        result leaves no model in the folder (only the report, and the checkpoint to resume)."""
        self.say(f"saving {self.out / save.PROGRAM} (version {version})")
        new_spec = save.write_model_folder(self.spec, model, self.out, version, self._how())
        try:
            self._result_rows(new_spec, model, accept)
            rows = self.state["rows"]
            verdict = gate.judge(rows[0]["accuracy"], rows[-1]["accuracy"],
                                 len(self.validation[1]), self.options.max_accuracy_drop, accept,
                                 self.metric.name)
            result = self._report(new_spec, verdict, seconds)
            result["files"] = report.write(result, self.out)
            if not verdict["ok"] and not accept:
                raise gate.refusal(verdict, result["files"]["json"])
        except BaseException:
            for name in (save.PROGRAM, "servetool.yaml", save.LABELS):
                (self.out / name).unlink(missing_ok=True)
            raise
        if result["unfinished"]:  # the time budget stopped training: a rerun trains on
            self.say(f"the checkpoint stays in {checkpoint.work_dir(self.out)}: a rerun goes on "
                     f"with {', '.join(result['unfinished'])}")
        else:
            checkpoint.clear(self.out)
        return result

    def _result_rows(self, new_spec: ModelSpec, model: torch.nn.Module, accept: bool) -> None:
        """The saved model's row (its ONNX export through package's gate), and int8's."""
        from servetool.convert.pipeline import convert

        self.say("gating the saved program's ONNX export against the program (as package does)")
        artifact, _ = convert(new_spec, "onnx", self.tmp / "result", accept_drift=accept)
        rows = self.state["rows"]
        others = tuple(f for f in self.bench.formats if f != "onnx")
        artifacts = {"onnx": artifact, **self._step_exports(model, new_spec, "result", others)}
        artifacts = {f: artifacts[f] for f in self.bench.formats if f in artifacts}
        rows.append(report.row(
            self._result_step(), accuracy=self._artifact_score(artifact, new_spec),
            size=artifact.size_bytes,
            counts=prune.count(model, self.example),
            timing=report.timing(artifacts, new_spec, self.bench)))
        if not self.options.int8:
            return
        self.say("int8 on top (onnx-int8-static, calibrated on the spec's data)")
        artifact, _ = convert(new_spec, "onnx-int8-static", self.tmp / "int8",
                                    accept_drift=accept)
        rows.append(report.row("int8", accuracy=self._artifact_score(artifact, new_spec),
                               size=artifact.size_bytes, note="onnx-int8-static",
                               timing=report.timing({"onnx-int8-static": artifact}, new_spec,
                                                    self.bench)))

    def _artifact_score(self, artifact, new_spec: ModelSpec) -> float:
        """The task's score of a served artifact on the validation set, run by the handler's own
        runtime (what the new version will answer)."""
        run = export.artifact_runner(artifact.format.runtime, artifact.path,
                                     options=artifact.runtime_options,
                                     input_names=[i.name for i in new_spec.inputs])
        x, target = self.validation
        outputs = np.concatenate([np.asarray(run(np.ascontiguousarray(x[i:i + 256]))[0])
                                  for i in range(0, len(x), 256)])
        return self.metric.score(outputs, target)

    def _result_step(self) -> str:
        if self.options.distill is None:
            return "pruned"
        return "student" if self.options.student is not None else "distilled"

    def _how(self) -> str:
        parts = []
        if self.options.prune is not None:
            p = self.options.prune
            parts.append(f"pruned to {p.target} {p.value:g} in {p.steps} step(s)")
        if self.options.student is not None:
            parts.append(f"student {self.options.student.class_name}")
        if self.options.distill is not None:
            parts.append("distilled from the original")
        return ", ".join(parts)

    def _report(self, new_spec: ModelSpec, verdict: dict[str, Any],
                seconds: float) -> dict[str, Any]:
        rows = report.finish(self.state["rows"])
        training = {stage: loop["log"] for stage, loop in self.state["loops"].items()}
        loops = {stage: distill.Loop(**loop) for stage, loop in self.state["loops"].items()}
        stopped = [stage for stage, loop in loops.items() if loop.stopped]
        unfinished = [stage for stage, loop in loops.items() if not loop.complete]
        return {"model": self.spec.name, "version": new_spec.version, "out": str(self.out),
                "spec": str(new_spec.spec_file), "how": self._how(), "rows": rows,
                "gate": verdict, "metric": self.metric.name, "training": training, "stopped_early": stopped,
                "unfinished": unfinished,
                "pruning": self._pruning(), "latency": {"threads": self.bench.threads,
                                                        "seconds": self.bench.seconds,
                                                        "formats": list(self.bench.formats)},
                "seconds": round(seconds, 1)}

    def _pruning(self) -> dict[str, Any] | None:
        if self.options.prune is None:
            return None
        p = self.options.prune
        return {"target": p.target, "value": p.value, "importance": p.importance,
                "steps": p.steps, "kept": self.keep, "round_to": p.round_to}

    def _bench(self, seconds: float, threads: int | None) -> report.Bench:
        from handlers.runtimes import available_cores

        return report.Bench(self.validation[0], self.tmp, threads or available_cores(), seconds,
                            self.options.formats)


def _teacher_logits(original, samples: data.Samples) -> np.ndarray:
    if samples.arrays is not None:
        return models.logits(original, samples.arrays)
    chunks = [models.logits(original, samples.rows(np.arange(i, min(i + 256, samples.count))))
              for i in range(0, samples.count, 256)]
    return np.concatenate(chunks)


def _counts(original, example: torch.Tensor) -> tuple[int, int] | None:
    """MACs and parameters of an original that is a plain PyTorch module (not TorchScript, a
    program or ONNX, whose layers torch-pruning's counter does not see)."""
    from servetool.convert.export.exported_program import ProgramModule

    if not isinstance(original, torch.nn.Module) or isinstance(
            original, (torch.jit.ScriptModule, ProgramModule)):
        return None
    return prune.count(original, example)
