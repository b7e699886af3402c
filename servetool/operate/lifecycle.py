"""Model versions on a running server: what should be serving, and the operations that change it.

A layer above the targets: it speaks to any target that registers archives from a model store
(local, Docker) through the same verbs (register a version, set the default, unregister), and
keeps the desired state in one file per run folder, `deployed.json` (read, written and locked by
servetool/targets/record.py):

    {"format": 2, "models": {NAME: {"default": "2.0", "history": ["1.0", "2.0"], "keep": 2,
                                    "versions": {"1.0": {"archive", "digest", "workers",
                                                          "loaded_at", "source"}, ...}}}}

`history` is the order in which versions became the default; `rollback` walks it back, and the
keep policy keeps the last `keep` distinct defaults loaded (so the version a rollback returns to is
still warm). Each registered archive is pinned in the model store under a name of its own
(NAME--VERSION--DIGEST.mar, a hard link where possible): `package` rewrites NAME.mar, and a
restart must find every recorded version's own bytes.

Every change holds a lock on the run folder (the watcher and a person's `promote` may act at once)
and follows one order, so that no request fails during a switch: register the new version with its
workers, smoke-test it on its own URL, make it the default, and only then drain and unregister what
the policy no longer keeps.

An install is a transaction: before TorchServe is touched the record gets the model's intent
(`"installing": {version, archive, digest, ...}`), and the version becomes the record's only with
the write that removes the intent, after it became the default. A process killed in between
(kill -9, a crash, the machine) leaves the intent; the next `restore` (deploy, the crash
supervisor, the watcher's start) and the next install settle it first: a version TorchServe
already serves as the default is completed in the record, anything earlier is undone
(unregistered, its pin removed, the entry it replaced put back), so that the record and the engine
agree again. A failure inside install undoes the same way at once.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from servetool.engines.base import Engine
from servetool.engines.torchserve import archive
from servetool.engines.torchserve.management import APIError, Client
from servetool.engines.torchserve.state import ServerState
from servetool.targets.common import DeployError, endpoints, find_archives, wait_ready
from servetool.targets.record import (
    DEFAULT_KEEP,
    PINNED,
    locked,
    pinned_name,
    read_record,
    recorded_archives,
    write_record,
)

# A model's install in progress, in the record from before the engine changes until it committed:
# {"version", "archive", "digest", "origin", "since", "pid", "replaces"}
INTENT = "installing"
HISTORY_LIMIT = 50
DRAIN_TIMEOUT_S = 60.0
# After a version's queue is empty, the batch its workers hold may still be running.
DRAIN_GRACE_S = 1.0
SMOKE_TIMEOUT_S = 60.0


class Target(Protocol):
    """What the lifecycle needs of a target (LocalTarget and DockerTarget have it)."""

    progress: Callable[[str], None]
    pins_archives: bool
    engine: Engine

    def require_running(self) -> ServerState: ...
    def make_client(self, state: ServerState) -> Client: ...
    def default_workers(self) -> int: ...
    def failure_logs(self, state: ServerState) -> str: ...


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def version_key(version: str) -> tuple:
    """Sort key of a version string: numbers compare as numbers (2.10 after 2.9), and a release
    after its pre-releases (1.0 after 1.0-rc1)."""
    parts = [(2, int(p), "") if p.isdigit() else (0, 0, p.lower())
             for p in re.findall(r"\d+|[A-Za-z]+", version)]
    # zeros that end a run of numbers say nothing: 2.0 == 2, and 1.0rc1 is 1rc1
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == (2, 0, "") and (i + 1 == len(parts) or parts[i + 1][0] != 2):
            del parts[i]
    # the end sorts after a suffix (1.0-rc1 < 1.0) and before more numbers (1.0 < 1.0.1)
    return (*parts, (1, 0, ""))


def pin(path: Path, store: Path, name: str, version: str, digest: str) -> Path:
    """The archive under its pinned name in the store (a hard link, else a copy; atomic)."""
    target = store / pinned_name(name, version, digest)
    if not target.is_symlink() and target.is_file() and archive.archive_digest(target) == digest:
        return target
    staged = store / f".{target.name}.partial"
    staged.unlink(missing_ok=True)
    try:
        try:
            os.link(path, staged)
        except OSError:
            shutil.copyfile(path, staged)  # another file system: a copy (it may find it full)
        os.replace(staged, target)  # a link planted under the pinned name is replaced, not followed
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return target


def refuse_link(path: Path, what: str = "archive") -> None:
    """A model store holds files: a symbolic link in it could make TorchServe load bytes from
    anywhere (lstat, not stat: the link itself is judged, not what it points to)."""
    if path.is_symlink():
        raise DeployError(f"the {what} {path} is a symbolic link (to {os.readlink(path)}): refused, "
                          "servetool registers only regular files of the model store; copy the "
                          "archive there instead")


def _model(models: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return models.setdefault(name, {"default": None, "history": [], "keep": DEFAULT_KEEP,
                                    "versions": {}})


# --- operations ----------------------------------------------------------------------------------
class Lifecycle:
    def __init__(self, target: Target, state: ServerState | None = None) -> None:
        self.target = target
        self.state = state or target.require_running()
        self.client = target.make_client(self.state)
        self.engine = target.engine  # registers, sets defaults and unregisters through the client
        self.say = target.progress
        self.run_dir = Path(self.state.run_dir)
        self.store = Path(self.state.model_store)

    # --- reading ---------------------------------------------------------------------------------
    def registered(self, name: str) -> list[str]:
        if not self.client.has_model(name):
            return []
        return [m["modelVersion"] for m in self.client.describe(name)]

    def server_default(self, name: str) -> str | None:
        try:
            return self.client.describe(name, None)[0]["modelVersion"]
        except APIError:
            return None

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a model: registered ones with their workers, recorded ones that are
        not loaded (a restart or `deploy` brings those back)."""
        recorded = read_record(self.run_dir).get(name, {})
        described = {m["modelVersion"]: m for m in self.client.describe(name)} \
            if self.client.has_model(name) else {}
        if not described and not recorded:
            raise DeployError(f"no model {name!r} is registered or recorded (see `servetool status`)")
        default = self.server_default(name) if described else None
        rows = []
        for version in sorted(set(described) | set(recorded.get("versions", {})), key=version_key):
            entry = recorded.get("versions", {}).get(version, {})
            m = described.get(version)
            rows.append({
                "version": version, "default": version == default, "loaded": m is not None,
                "workers": [{"id": w["id"], "status": w["status"]} for w in m.get("workers", [])]
                if m else [],
                "pending_requests": ((m or {}).get("jobQueueStatus") or {}).get("pendingRequests"),
                "loaded_at": entry.get("loaded_at"), "digest": entry.get("digest"),
                "archive": entry.get("archive"), "source": entry.get("source")})
        return rows

    # --- changing --------------------------------------------------------------------------------
    def install(self, path: Path, *, origin: str | None = None, keep: int | None = None,
                timeout_s: float = 300, make_default: bool = True) -> dict[str, Any]:
        """Register an archive's version and make it the default (unless it is already serving
        these very bytes): register, smoke-test, set default, unload what the policy drops.
        A version that fails any step is unregistered again and never becomes the default."""
        refuse_link(path)
        contents = archive.archive_manifest(path)
        meta = contents["manifest"]["model"]
        name, version = meta["modelName"], str(meta["modelVersion"])
        digest = archive.archive_digest(path)
        with locked(self.run_dir, self.say) as models:
            self._recover(models)  # an install a crash interrupted is settled before another
            model = _model(models, name)
            if keep is not None:
                model["keep"] = keep
            loaded = self.registered(name)
            self._adopt(model, name, loaded)
            known = model["versions"].get(version)
            same = bool(known) and known.get("digest") == digest
            if version in loaded and same:
                self.say(f"{name} {version}: unchanged, left as it is")
                return self._result(name, version, "unchanged", path, timeout_s)
            file = self.store / pinned_name(name, version, digest) if self.target.pins_archives \
                else path
            # the intent is on disk before the engine changes: a crash at any point after it is
            # finished or undone by the next restore (`_recover`), so record and engine agree
            intent = {"version": version, "archive": file.name, "digest": digest,
                      "origin": origin, "since": now(), "pid": os.getpid(),
                      "replaces": known}
            model[INTENT] = intent
            try:
                write_record(self.run_dir, models)
                if version in loaded:  # same version, new content: it must go before it returns
                    self.say(f"{name} {version}: archive changed, re-registering")
                    self._unregister(model, name, version, loaded)
                    loaded.remove(version)
                    action = "re-registered"
                else:
                    action = "upgraded" if loaded else "registered"
                if self.target.pins_archives:
                    file = pin(path, self.store, name, version, digest)
                workers = self._register(file, name, version, contents["config"],
                                         self._workers_for(model, contents["config"]), timeout_s)
                model["versions"][version] = {"archive": file.name, "digest": digest,
                                              "workers": workers, "loaded_at": now(),
                                              **({"source": origin} if origin else {})}
                write_record(self.run_dir, models)
                self.smoke_test(name, version, file, model)
                if make_default or not loaded:  # a model's first version is its default anyway
                    self._make_default(model, name, version)
                else:
                    action = "loaded"  # beside the default, for a canary or a promote later
            except BaseException:
                try:
                    self._undo(models, name, intent)
                except Exception as exc:  # noqa: BLE001 (the failure that led here is the one told)
                    self.say(f"{name} {version}: undoing its install failed too ({exc}); the "
                             "next restore finishes it")
                raise
            model.pop(INTENT, None)  # the commit: from here on the version is the record's
            write_record(self.run_dir, models)
            if action != "loaded":
                self._prune(model, name)
        return self._result(name, version, action, file, timeout_s)

    def restore(self, timeout_s: float = 300) -> list[dict[str, Any]]:
        """Bring the server to the record: every recorded version registered (with its worker
        count), and each model's recorded default the default. After a restart, exactly what was
        serving; on a running server, a no-op."""
        results = []
        with locked(self.run_dir, self.say) as models:
            self._recover(models)
            for name, model in models.items():
                loaded = self.registered(name)
                default = model.get("default")
                # the default first: it is the one serving, and a model's first version is its default
                order = sorted(model["versions"], key=lambda v: (v != default, version_key(v)))
                for version in order:
                    if version in loaded:
                        continue
                    entry = model["versions"][version]
                    file = self.store / str(entry.get("archive") or "")
                    if file.is_symlink():
                        self.say(f"{name} {version}: its archive {file.name} in the model store is "
                                 f"a symbolic link (to {os.readlink(file)}): refused, not "
                                 "registered, and forgotten")
                        del model["versions"][version]
                        continue
                    if not file.is_file():
                        self.say(f"{name} {version}: its archive {file.name} is no longer in the "
                                 "model store; forgotten")
                        del model["versions"][version]
                        continue
                    config = archive.archive_manifest(file)["config"]
                    self._register(file, name, version, config, entry.get("workers"), timeout_s)
                    entry["loaded_at"] = now()
                    loaded.append(version)
                    results.append(self._result(name, version, "restored", file, timeout_s))
                if default in loaded and self.server_default(name) != default:
                    self.engine.set_default(self.client, name, default)
                    self.say(f"{name}: default set back to {default}")
        return results

    def _recover(self, models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Under the lock every intent left in the record is an interrupted install (a running
        install holds the lock until it has committed or undone it). A version the engine already
        serves as the default passed its smoke test: the record is completed. Any other state
        (registered or not, ready or still starting, the record's entry written or not) is
        undone: unregistered, its pin removed, the entry it replaced put back. A model's only
        version is TorchServe's default from its registration on, before its smoke test: undone."""
        done = []
        for name, model in list(models.items()):
            intent = model.get(INTENT)
            if not isinstance(intent, dict) or not intent.get("version"):
                model.pop(INTENT, None)
                continue
            version = str(intent["version"])
            loaded = self.registered(name)
            if version in loaded and len(loaded) > 1 and self.server_default(name) == version:
                model["versions"][version] = {
                    **model["versions"].get(version, {}), "archive": intent.get("archive"),
                    "digest": intent.get("digest"),
                    "workers": len(self.client.describe(name, version)[0].get("workers", []))
                    or None, "loaded_at": now(),
                    **({"source": intent["origin"]} if intent.get("origin") else {})}
                model["default"] = version
                if not model["history"] or model["history"][-1] != version:
                    model["history"] = (model["history"] + [version])[-HISTORY_LIMIT:]
                model.pop(INTENT)
                self.say(f"{name} {version}: an install interrupted after it became the default "
                         f"(pid {intent.get('pid')}, {intent.get('since')}): its record completed")
                done.append({"name": name, "version": version, "action": "completed"})
            else:
                self.say(f"{name} {version}: an install interrupted before it served (pid "
                         f"{intent.get('pid')}, {intent.get('since')}): undone"
                         + (", unregistered" if version in loaded else ""))
                self._undo(models, name, intent, loaded)
                done.append({"name": name, "version": version, "action": "undone"})
            write_record(self.run_dir, models)
        return done

    def _undo(self, models: dict[str, dict[str, Any]], name: str, intent: dict[str, Any],
              loaded: list[str] | None = None) -> None:
        """Take back an install that did not commit: the engine without the version (the default
        handed back first), the record as before it. Where the engine cannot be reached the
        intent stays, for the next restore to finish the job."""
        model = models[name]
        version = str(intent["version"])
        try:
            loaded = self.registered(name) if loaded is None else loaded
            if version in loaded:
                if self.server_default(name) == version and len(loaded) > 1:
                    self._unregister(model, name, version, loaded)  # it may have taken traffic
                else:
                    self._drop(name, version)
                    if version in self.registered(name):
                        raise DeployError(f"{name} {version} could not be unregistered")
        except (APIError, DeployError) as exc:
            self.say(f"{name} {version}: undoing its install failed ({exc}); the next restore "
                     "(`servetool deploy`, the watcher's start) tries again")
            write_record(self.run_dir, models)
            return
        entry = model["versions"].pop(version, None)
        replaced = intent.get("replaces")
        if isinstance(replaced, dict):
            model["versions"][version] = replaced  # a restore registers its bytes again
        # the pin this install made goes, unless an entry (the one put back) names it
        self._forget_archive(model, {"archive": (entry or {}).get("archive") or intent.get("archive")})
        model.pop(INTENT, None)
        if not model["versions"] and not model.get("history"):
            del models[name]  # a first version that never served: as if never installed
        write_record(self.run_dir, models)

    def promote(self, name: str, version: str, timeout_s: float = 300) -> dict[str, Any]:
        """Make a loaded (or recorded) version the default, after a smoke test."""
        with locked(self.run_dir, self.say) as models:
            model = _model(models, name)
            loaded = self.registered(name)
            self._ensure_loaded(model, name, version, loaded, timeout_s)
            entry = model["versions"].get(version, {})
            self.smoke_test(name, version, self.store / str(entry.get("archive") or ""), model)
            self._make_default(model, name, version)
            self._prune(model, name)
        return {"name": name, "default": version}

    def rollback(self, name: str, to: str | None = None, timeout_s: float = 300) -> dict[str, Any]:
        """Back to the previous default (or `to`), which the keep policy kept loaded."""
        with locked(self.run_dir, self.say) as models:
            if name not in models:
                raise DeployError(f"no model {name!r} is recorded (see `servetool status`)")
            model = models[name]
            loaded = self.registered(name)
            current = self.server_default(name) or model.get("default")
            if to is None:
                earlier = [v for v in reversed(model["history"]) if v != current and v in loaded]
                if not earlier:
                    others = [v for v in loaded if v != current]
                    hint = (f"`servetool promote {name} VERSION` makes one of {', '.join(others)} "
                            "the default" if others else "deploy an older archive again")
                    raise DeployError(f"{name}: no earlier default of {current} is still loaded to "
                                      f"roll back to (the policy keeps {model.get('keep')}): {hint}")
                to = earlier[0]
            elif to == current:
                raise DeployError(f"{name} {to} is already the default")
            self._ensure_loaded(model, name, to, loaded, timeout_s)
            self.engine.set_default(self.client, name, to)
            while model["history"] and model["history"][-1] == current:
                model["history"].pop()  # rolled back from: not a target of the next rollback
            if not model["history"] or model["history"][-1] != to:
                model["history"].append(to)
            model["default"] = to
            self.say(f"{name}: default is {to} (was {current})")
        return {"name": name, "default": to, "previous": current}

    def set_keep(self, name: str, keep: int) -> None:
        with locked(self.run_dir, self.say) as models:
            _model(models, name)["keep"] = keep

    def unload(self, name: str, version: str) -> dict[str, Any]:
        """Unregister one version (a default is rolled back from first); never the last one."""
        with locked(self.run_dir, self.say) as models:
            model = _model(models, name)
            loaded = self.registered(name)
            if version not in loaded:
                model["versions"].pop(version, None)
                return {"name": name, "unloaded": None}
            if loaded == [version]:
                raise DeployError(f"{name} {version} is the only version serving: it stays")
            self._unregister(model, name, version, loaded)
            model["versions"].pop(version, None)
        return {"name": name, "unloaded": version}

    # --- steps -----------------------------------------------------------------------------------
    def smoke_test(self, name: str, version: str, file: Path, model: dict[str, Any]) -> None:
        """One request to the version's own URL must come back 200 with JSON from that version."""
        request = archive.smoke_request(file) if file.is_file() else None
        for other in sorted(model["versions"], key=version_key, reverse=True):
            if request is not None:
                break
            other_file = self.store / str(model["versions"][other].get("archive") or "")
            request = archive.smoke_request(other_file) if other_file.is_file() else None
        if request is None:
            self.say(f"{name} {version}: no smoke-test request in its archive or an earlier one's; "
                     "its workers loaded, which is all that was checked")
            return
        body, content_type = request
        try:
            reply = self.client.predict(name, body, content_type, version, timeout=SMOKE_TIMEOUT_S)
            problem = None if reply.status_code == 200 else f"answered {reply.status_code}: " \
                f"{reply.text.strip()[:300]}"
            if problem is None:
                reply.json()
            answered = reply.headers.get("X-Model-Version")
            if problem is None and answered not in (None, version):
                problem = f"was answered by version {answered}"
        except APIError as exc:
            problem = str(exc)
        except ValueError:
            problem = f"answered 200 without JSON: {reply.text[:200]!r}"
        if problem:
            raise DeployError(f"{name} {version}: the smoke test (its archive's sample request on "
                              f"/predictions/{name}/{version}) {problem}; it was unloaded and "
                              "never took traffic")
        self.say(f"{name} {version}: smoke test passed")

    def _register(self, file: Path, name: str, version: str, config: dict[str, Any],
                  workers: int | None, timeout_s: float) -> int:
        declared = config.get("minWorkers")
        workers = workers if workers is not None else int(declared or self.target.default_workers())
        self.say(f"{name} {version}: registering {file.name} and starting {workers} worker(s)")
        try:
            self.engine.register(self.client, file.name, name, version, workers,
                                 float(config.get("responseTimeout", 120)) + 120)
        except APIError as exc:
            raise DeployError(f"registering {name} {version} failed: {exc}\n"
                              + self.target.failure_logs(self.state)) from None
        if declared is not None and int(declared) != workers:
            # registration keeps to the archive's min/max; a count set by `scale` may lie outside
            self.engine.scale(self.client, name, workers, version)
        wait_ready(self.client, name, version, timeout_s, expect=workers)
        return workers

    def _adopt(self, model: dict[str, Any], name: str, loaded: list[str]) -> None:
        """A model registered without servetool's record (a pod's startup models, another client):
        its serving default enters the record, so the keep policy and rollback know it."""
        if model["history"] or not loaded:
            return
        described = self.client.describe(name, None)[0]
        default = described["modelVersion"]
        model["default"], model["history"] = default, [default]
        model["versions"].setdefault(default, {
            "archive": described.get("modelUrl"), "digest": None,
            "workers": len(described.get("workers", [])) or None, "loaded_at": None})

    def _workers_for(self, model: dict[str, Any], config: dict[str, Any]) -> int | None:
        """A new version gets the worker count its predecessor serves with (set by `scale` for
        today's load); the first version the archive's own, or one per core."""
        current = model["versions"].get(model.get("default") or "", {})
        if current.get("workers"):
            return int(current["workers"])
        return int(config["minWorkers"]) if config.get("minWorkers") else None

    def _ensure_loaded(self, model: dict[str, Any], name: str, version: str, loaded: list[str],
                       timeout_s: float) -> None:
        if version in loaded:
            return
        entry = model["versions"].get(version)
        file = self.store / str((entry or {}).get("archive") or "")
        if entry is None or not file.is_file():
            raise DeployError(f"{name} {version} is not loaded (loaded: {', '.join(loaded) or 'none'})"
                              f": deploy its archive again")
        self._register(file, name, version, archive.archive_manifest(file)["config"],
                       entry.get("workers"), timeout_s)
        entry["loaded_at"] = now()
        loaded.append(version)

    def _make_default(self, model: dict[str, Any], name: str, version: str) -> None:
        self.engine.set_default(self.client, name, version)
        previous = model.get("default")
        model["default"] = version
        if not model["history"] or model["history"][-1] != version:
            model["history"] = (model["history"] + [version])[-HISTORY_LIMIT:]
        if previous and previous != version:
            self.say(f"{name}: default is {version} (was {previous})")

    def _prune(self, model: dict[str, Any], name: str) -> None:
        """Unload the loaded versions beyond the policy: it keeps the last `keep` defaults. A
        version loaded beside the default that never was one (`deploy --no-promote`, a canary's
        candidate) is not the policy's to unload."""
        keep: list[str] = []
        for version in reversed(model["history"]):
            if version not in keep:
                keep.append(version)
        keep = keep[:max(1, int(model.get("keep") or DEFAULT_KEEP))]
        loaded = self.registered(name)
        for version in loaded:
            if version in model["history"] and version not in keep and version != model["default"]:
                self.say(f"{name} {version}: unloading (the policy keeps {', '.join(keep)})")
                self._unregister(model, name, version, list(loaded))
                entry = model["versions"].pop(version, None)
                self._forget_archive(model, entry)

    def _unregister(self, model: dict[str, Any], name: str, version: str, loaded: list[str]) -> None:
        """Unregister without failing a request: a default hands over first (TorchServe refuses
        to remove a default while other versions exist), then its queue drains."""
        others = [v for v in loaded if v != version]
        if others and self.server_default(name) == version:
            fallback = next((v for v in reversed(model["history"]) if v in others),
                            max(others, key=version_key))
            self.engine.set_default(self.client, name, fallback)
            model["default"] = fallback
            self.say(f"{name}: default is {fallback} while {version} goes")
        self.drain(name, version)
        self.engine.unregister(self.client, name, version)

    def _drop(self, name: str, version: str) -> None:
        """Unregister a version that failed before taking traffic (it may be the only one)."""
        try:
            self.engine.unregister(self.client, name, version)
        except APIError as exc:
            self.say(f"{name} {version}: could not unregister it after its failure: {exc}")

    def drain(self, name: str, version: str, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Wait until no request is queued for the version, then a grace for the batch in hand."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            described = self.client.describe(name, version)[0]
            if not (described.get("jobQueueStatus") or {}).get("pendingRequests"):
                time.sleep(DRAIN_GRACE_S)
                described = self.client.describe(name, version)[0]
                if not (described.get("jobQueueStatus") or {}).get("pendingRequests"):
                    return
            time.sleep(0.1)
        self.say(f"{name} {version}: requests still queued after {timeout_s:.0f} s; unloading anyway")

    def _forget_archive(self, model: dict[str, Any], entry: dict[str, Any] | None) -> None:
        """Remove an unloaded version's pinned archive unless another record entry uses it."""
        name = str((entry or {}).get("archive") or "")
        used = {str(e.get("archive")) for e in model["versions"].values()}
        if PINNED.match(name) and name not in used:
            (self.store / name).unlink(missing_ok=True)

    def _result(self, name: str, version: str, action: str, file: Path,
                timeout_s: float) -> dict[str, Any]:
        return {"name": name, "version": version, "action": action, "archive": str(file),
                "workers": wait_ready(self.client, name, version, timeout_s),
                "predictions_url": self.engine.predictions_url(self.state, name)}


# --- a deployment: its target's server up, then the record, then the archives named ----------------
def deploy(target: Any, names: list[str] | tuple[str, ...], timeout_s: float = 300) -> dict[str, Any]:
    """`servetool deploy` on a target that runs one server (local, docker). Idempotent: an archive
    already registered with the same digest is left alone, a new version is installed (registered
    beside the serving one, smoke-tested, made the default, what the keep policy drops unloaded
    after it drained), and the server is started only when none is running. When it was crashed
    or stopped, what the record says should serve comes back first, not only the archives named."""
    archives = find_archives(names, target.opts.model_store)
    target.prepare(archives)
    started = time.perf_counter()
    recorded = recorded_archives(target.opts.run_dir, target.opts.model_store)
    target.opts.sizes = archive.archive_sizes(archives + recorded)
    state, fresh = target.up()
    if not fresh:
        target.check_size_limits(state)
    if Path(state.model_store) != target.opts.model_store.resolve():
        raise DeployError(f"the running TorchServe serves archives from {state.model_store}, not "
                          f"{target.opts.model_store.resolve()}: use that model store, or "
                          "`servetool stop` first")
    life = Lifecycle(target, state)
    # what the record says should serve comes back first (every version, each default): after
    # a restart that is exactly what was serving, not only the archives named here
    results = {(r["name"], r["version"]): r for r in life.restore(timeout_s)}
    record = read_record(Path(state.run_dir))
    for path in newest_per_model(archives, target.progress):
        if not names and behind_default(path, record, target.progress):
            continue
        result = life.install(path, keep=target.keep, timeout_s=timeout_s,
                              make_default=target.promote)
        results.setdefault((result["name"], result["version"]), result)
    return {
        "target": target.name,
        "server_started": fresh,
        "engine": state.engine,
        "run_dir": state.run_dir,
        "endpoints": endpoints(state, target.engine),
        "token_auth": state.token_auth,
        "models": list(results.values()),
        "seconds": round(time.perf_counter() - started, 2),
    } | target.deployed()


def restore_server(target: Any, timeout_s: float = 300) -> dict[str, Any]:
    """The server up with every recorded version and default (the crash supervisor's job)."""
    state, _ = target.up()
    return {"models": Lifecycle(target, state).restore(timeout_s)}


def behind_default(path: Path, record: dict[str, Any], say: Callable[[str], None]) -> bool:
    """An archive in the store older than its model's serving default is not deployed unless
    named: a plain `deploy` after a rollback or a watcher's upgrade must not undo it."""
    meta = archive.archive_manifest(path)["manifest"]["model"]
    model = record.get(meta["modelName"], {})
    version, default = str(meta["modelVersion"]), model.get("default")
    if not default or version in model.get("versions", {}) or \
            version_key(version) >= version_key(default):
        return False
    say(f"{meta['modelName']}: {path.name} ({version}) is older than the serving default "
        f"{default}; left out (name it to deploy it)")
    return True


def newest_per_model(archives: list[Path], say: Callable[[str], None]) -> list[Path]:
    """One archive per model: the highest version (numeric-aware: 10.0 after 9.1), whatever
    the file names; an older one found beside it is left out, and said so."""
    newest: dict[str, tuple[tuple, Path]] = {}
    for path in archives:
        meta = archive.archive_manifest(path)["manifest"]["model"]
        key = version_key(str(meta["modelVersion"]))
        name = meta["modelName"]
        if name in newest and newest[name][0] >= key:
            say(f"{name}: {path.name} ({meta['modelVersion']}) is older than "
                f"{newest[name][1].name}; left out")
            continue
        if name in newest:
            say(f"{name}: {newest[name][1].name} is older than {path.name}; left out")
        newest[name] = (key, path)
    return [path for _, path in newest.values()]
