"""Canary releases: a share of a model's traffic to a candidate version, stepped up while it
behaves like the default, promoted at the end, or rolled back on a breach.

The split is HAProxy's (servetool/engines/torchserve/split.py, `deploy --split`): a weight per
model, changed at run time through the target (on this machine, or inside the Docker container).
The judgement reads servetool's handler metrics per version from TorchServe's metrics port
(servetool/operate/top.py): over
each step, the candidate's error ratio may exceed the default's by at most `max_error_increase`
(absolute), and its p99 inference time may be at most `max_p99_ratio` times
the default's. A step is judged only once the candidate has answered `min_requests` requests in
it; until then the controller waits and says how many it has (a quiet model does not get promoted
on no evidence, and the wait is visible). On a breach the weight goes to 0 at once (the default
takes everything again) and the reason is kept; after the last step (100%) the candidate is
promoted through the lifecycle (smoke test, default, keep policy) and the weight goes back to 0.

The state (model, candidate, weight, step, status, reason, the last figures) is in
RUN_DIR/canary.json, which `servetool status` and `servetool canary MODEL` show.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from servetool import runfiles
from servetool.engines.torchserve import split
from servetool.errors import ServetoolError
from servetool.operate import lifecycle, top

STATE_FILE = "canary.json"
DEFAULT_STEPS = (10, 25, 50, 100)


class CanaryError(ServetoolError):
    pass


@dataclass
class Bounds:
    max_error_increase: float = 0.01  # the candidate's error ratio minus the default's
    max_p99_ratio: float = 1.5  # the candidate's p99 inference time over the default's
    min_requests: int = 50  # answered by the candidate in a step before it is judged
    # a slowdown smaller than this is noise, whatever its ratio (a 0.2 ms model reads 0.3 ms on
    # a cold worker): 5x of 0.2 ms still exceeds it
    min_slowdown_ms: float = 0.5


ERROR_Z = 2.33  # one-sided, 99%


def _standard_error(default: dict[str, Any], candidate: dict[str, Any]) -> float:
    n_d, n_c = max(default.get("requests", 0), 0), max(candidate.get("requests", 0), 0)
    if not n_d or not n_c:
        return 0.0
    pooled = ((default.get("error_ratio") or 0) * n_d + (candidate.get("error_ratio") or 0) * n_c) \
        / (n_d + n_c)
    return (pooled * (1 - pooled) * (1 / n_d + 1 / n_c)) ** 0.5


def judge(default: dict[str, Any] | None, candidate: dict[str, Any] | None,
          bounds: Bounds) -> tuple[str, str]:
    """('wait' | 'breach' | 'pass', why) for one step's figures of both versions."""
    answered = round((candidate or {}).get("requests", 0))
    if answered < bounds.min_requests:
        return "wait", f"{answered} of the {bounds.min_requests} requests a step needs"
    base_errors = (default or {}).get("error_ratio") or 0.0
    errors = candidate.get("error_ratio") or 0.0
    excess = errors - base_errors - bounds.max_error_increase
    # Beyond the bound and beyond chance: two error ratios over a few hundred requests differ by a
    # point or two at random, so the excess must be ERROR_Z standard errors (one-sided z-test of
    # two proportions, pooled), which a clearly bad version reaches within the minimum requests.
    if excess > 0 and excess > ERROR_Z * _standard_error(default or {}, candidate):
        return "breach", (f"error ratio {errors:.1%} against the default's {base_errors:.1%} "
                          f"(allowed: +{bounds.max_error_increase:.1%})")
    # p99 from the histograms, and the exact mean: TorchServe's fixed buckets (the first ends at
    # 5 ms) hide a fast model's slowdown from the p99 alone
    for figure, label in (("inference_p99_ms", "p99"), ("inference_mean_ms", "mean")):
        base = (default or {}).get(figure)
        value = candidate.get(figure)
        if base and value and value > base * bounds.max_p99_ratio and \
                value - base > bounds.min_slowdown_ms:
            return "breach", (f"{label} inference time {value:.2f} ms against the default's "
                              f"{base:.2f} ms (allowed: x{bounds.max_p99_ratio:g})")
    base_p99, p99 = (default or {}).get("inference_p99_ms"), candidate.get("inference_p99_ms")
    return "pass", (f"{answered} requests, error ratio {errors:.1%} (default {base_errors:.1%}), "
                    f"p99 {p99 if p99 is not None else '-'} ms (default "
                    f"{base_p99 if base_p99 is not None else '-'} ms)")


def on_server_start(run_dir: Path) -> None:
    """A server (re)starting while an automatic canary was running: the controller may be gone
    with it, and a split nobody judges must not go on, so its weight is 0 in the maps HAProxy
    loads. A weight set by hand (`--weight`) stays: that one was meant to last."""
    state = read_state(run_dir)
    if not state or state.get("status") not in ("running", "orphaned"):
        return
    split.reset_weight(run_dir, state["model"])
    _save(run_dir, {**state, "weight": 0, "status": "aborted",
                    "reason": "the server restarted during the canary; run it again"})


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """canary.json; an automatic canary whose controller is gone (killed, its terminal closed)
    reads as "orphaned": its weight stays, judged by nobody, until --abort or a new --auto."""
    try:
        state = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("status") == "running" and not _alive(state.get("controller_pid")):
        state = {**state, "status": "orphaned",
                 "reason": f"its controller (pid {state.get('controller_pid')}) is gone with the "
                           f"weight at {state.get('weight')}%: --abort, or run --auto again"}
    return state


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _save(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    state["updated"] = datetime.now().astimezone().isoformat(timespec="seconds")
    runfiles.write_private(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
    return state


class Canary:
    def __init__(self, target: Any, say: Callable[[str], None] = lambda _: None) -> None:
        self.target = target
        self.state = target.require_running()
        if not self.state.split_metrics_port:
            raise CanaryError("this deployment has no traffic split in front of TorchServe: "
                              "`servetool stop`, then `servetool deploy --split` (HAProxy on the "
                              "inference port; see the README's Canary section)")
        self.run_dir = Path(self.state.run_dir)
        self.life = lifecycle.Lifecycle(target, self.state)
        self.metrics_url = f"http://127.0.0.1:{self.state.ports['metrics']}/metrics"
        self.say = say

    def _check(self, model: str, version: str) -> str:
        loaded = self.life.registered(model)
        default = self.life.server_default(model)
        if version not in loaded:
            raise CanaryError(f"{model} {version} is not loaded (loaded: {', '.join(loaded) or 'none'}): "
                              "deploy or publish it first; it must not be the default")
        if version == default:
            raise CanaryError(f"{model} {version} is already the default")
        return str(default)

    def set_weight(self, model: str, version: str, weight: int) -> dict[str, Any]:
        default = self._check(model, version)
        self.target.set_split(model, version, weight)
        return _save(self.run_dir, {"model": model, "candidate": version, "default": default,
                                    "weight": weight, "status": "manual", "reason": None})

    def abort(self, model: str) -> dict[str, Any]:
        state = read_state(self.run_dir) or {}
        if state.get("model") != model:
            raise CanaryError(f"no canary of {model} to abort")
        self.target.set_split(model, state["candidate"], 0)
        return _save(self.run_dir, {**state, "weight": 0, "status": "aborted",
                                    "reason": "aborted by hand"})

    def run(self, model: str, version: str, steps: tuple[int, ...] = DEFAULT_STEPS,
            interval_s: float = 30.0, bounds: Bounds | None = None,
            stopping: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """Step the weight up, judging each step; promote or roll back. Returns the final state."""
        bounds = bounds or Bounds()
        default = self._check(model, version)
        current = read_state(self.run_dir) or {}
        if current.get("status") == "running":  # read_state says so only of a live controller
            raise CanaryError(f"a canary controller (pid {current['controller_pid']}) is already "
                              f"running {current['model']} {current['candidate']} here")
        self.baseline: dict[str, Any] | None = None
        state = {"model": model, "candidate": version, "default": default, "weight": 0,
                 "controller_pid": os.getpid(),
                 "steps": list(steps), "interval_s": interval_s, "bounds": asdict(bounds),
                 "status": "running", "reason": None, "figures": None}
        try:
            for weight in steps:
                self.target.set_split(model, version, weight)
                state = _save(self.run_dir, {**state, "weight": weight})
                self.say(f"{model}: {weight}% of the traffic to {version}")
                verdict, why, figures = self._step(model, version, default, interval_s, bounds,
                                                   stopping)
                state["figures"] = figures
                if verdict == "breach":
                    self.target.set_split(model, version, 0)
                    self.say(f"{model}: rolled back from {version}: {why}")
                    return _save(self.run_dir, {**state, "weight": 0, "status": "rolled_back",
                                                "reason": why})
                if verdict == "stopped":
                    raise KeyboardInterrupt
                self.say(f"{model}: {weight}% step passed: {why}")
            self.life.promote(model, version)
            self.target.set_split(model, version, 0)
            self.say(f"{model}: {version} promoted to the default")
            return _save(self.run_dir, {**state, "weight": 0, "status": "promoted",
                                        "reason": "every step within bounds"})
        except (KeyboardInterrupt, ServetoolError) as exc:
            self.target.set_split(model, version, 0)
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            _save(self.run_dir, {**state, "weight": 0, "status": "aborted", "reason": why})
            raise

    baseline: dict[str, Any] | None = None  # the default's figures, from the last step it served

    def _step(self, model: str, version: str, default: str, interval_s: float, bounds: Bounds,
              stopping: Callable[[], bool]) -> tuple[str, str, dict[str, Any]]:
        """Judge one step, over a window that grows by `interval_s` until there is evidence. The
        first third of an interval is not judged: a version that just got its share warms up
        (first runs at new batch sizes, idle thread pools), which is not what it will be."""
        warmup = time.monotonic() + interval_s / 3
        while time.monotonic() < warmup:
            if stopping():
                return "stopped", "", {}
            time.sleep(0.1)
        start = top.read_metrics(self.metrics_url)
        while True:
            deadline = time.monotonic() + interval_s
            while time.monotonic() < deadline:
                if stopping():
                    return "stopped", "", {}
                time.sleep(0.1)
            rows = {r["version"]: r for r in top.figures(start, top.read_metrics(self.metrics_url))
                    if r["model"] == model}
            seconds = max(time.monotonic() - start["at"], 1e-9)
            for row in rows.values():
                row["requests"] = row["requests_per_s"] * seconds
            base = rows.get(default)
            if base and round(base["requests"]) >= bounds.min_requests:
                self.baseline = base
            # at 100% (or close) the default answers nothing: its last measured figures stand in
            verdict, why = judge(self.baseline, rows.get(version), bounds)
            if verdict != "wait":
                return verdict, why, rows
            self.say(f"{model}: waiting for evidence on {version}: {why}")
