"""Where new model versions are published: a folder, or an S3-compatible bucket prefix.

Layout (the same in both): SOURCE/MODEL/VERSION/ holds either one built archive (*.mar) or a
servetool model folder (servetool.yaml and the files it names), and a marker file READY.

A version counts as published only once its READY marker exists, written last by the publisher.
Why a marker and not an atomic rename: a bucket has no rename (a "folder" is many objects, each
uploaded on its own), and one rule for both sources is one rule to learn; in a folder, a rename of a
finished MODEL/.tmp-VERSION to MODEL/VERSION works too, as long as READY is inside it. The marker
may carry the archive's SHA-256 (`{"sha256": "..."}`), checked before anything is loaded.

A version's fingerprint (names, sizes and mtimes or ETags of everything under it) is what the
watcher remembers: a failed version is retried only when it changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from servetool.errors import ServetoolError, whole_cause

MARKER = "READY"
SPEC_FILE = "servetool.yaml"


class SourceError(ServetoolError):
    pass


@dataclass(frozen=True)
class Published:
    model: str
    version: str
    complete: bool  # its READY marker is there
    fingerprint: str
    files: tuple[str, ...] = field(default=(), compare=False)  # relative to the version folder
    marker: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> str:
        """'archive', 'folder', or why neither."""
        archives = [f for f in self.files if f.endswith(".mar") and "/" not in f]
        if len(archives) == 1:
            return "archive"
        if SPEC_FILE in self.files:
            return "folder"
        if len(archives) > 1:
            return f"{len(archives)} archives (one per version folder)"
        return f"neither an archive (*.mar) nor a model folder ({SPEC_FILE})"


class Source(Protocol):
    url: str
    default_interval_s: float

    def scan(self) -> list[Published]: ...
    def fetch(self, published: Published, dest: Path) -> None: ...


def parse_marker(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data) if data.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _fingerprint(items: list[tuple[str, ...]]) -> str:
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()[:16]


def safe_target(dest: Path, rel: str) -> Path:
    """dest/rel, refused if rel would leave dest (an object key may hold '..' or start with '/')."""
    target = (dest / rel).resolve()
    if rel.startswith("/") or not target.is_relative_to(dest.resolve()):
        raise SourceError(f"{rel!r} would be written outside the version's folder: refused")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


class FolderSource:
    default_interval_s = 2.0  # a directory listing costs nothing

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = str(self.root)

    def scan(self) -> list[Published]:
        if not self.root.is_dir():
            raise SourceError(f"the watched folder {self.root} does not exist")
        found = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if version_dir.name.startswith("."):  # a publisher's temporary folder
                    continue
                files, items = [], []
                for path in sorted(version_dir.rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        rel = path.relative_to(version_dir).as_posix()
                        info = path.stat()
                        items.append((rel, str(info.st_size), str(info.st_mtime_ns)))
                        if rel != MARKER:
                            files.append(rel)
                marker = version_dir / MARKER
                found.append(Published(
                    model_dir.name, version_dir.name, marker.is_file(), _fingerprint(items),
                    tuple(files), parse_marker(marker.read_bytes()) if marker.is_file() else {}))
        return found

    def fetch(self, published: Published, dest: Path) -> None:
        """A copy of the version folder (the publisher may change the source meanwhile)."""
        src = self.root / published.model / published.version
        for rel in published.files:
            shutil.copyfile(src / rel, safe_target(dest, rel))


class BucketSource:
    """s3://BUCKET/PREFIX through boto3: credentials from its usual chain (environment, shared
    files, instance roles), an endpoint URL for S3-compatible stores that are not AWS."""

    default_interval_s = 10.0  # one LIST request per interval (about 8,600 a day)

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise SourceError(f"{url!r} is not an s3://BUCKET[/PREFIX] address")
        self.url = url
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        self.endpoint_url = endpoint_url
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=Config(
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                read_timeout=30))
        return self._client

    def _call(self, what: str, func: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return func(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            where = f" at {self.endpoint_url}" if self.endpoint_url else ""
            raise SourceError(f"{what} s3://{self.bucket}/{self.prefix}{where} failed: "
                              f"{whole_cause(exc)}") from None

    def scan(self) -> list[Published]:
        objects: dict[tuple[str, str], list[dict[str, Any]]] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call("listing", lambda: list(paginator.paginate(Bucket=self.bucket,
                                                                       Prefix=self.prefix)))
        for page in pages:
            for obj in page.get("Contents", []):
                parts = obj["Key"][len(self.prefix):].split("/", 2)
                if len(parts) == 3 and parts[2] and not parts[1].startswith("."):
                    objects.setdefault((parts[0], parts[1]), []).append({**obj, "rel": parts[2]})
        found = []
        for (model, version), objs in sorted(objects.items()):
            items = [(o["rel"], str(o["Size"]), str(o.get("ETag", ""))) for o in objs]
            marker = next((o for o in objs if o["rel"] == MARKER), None)
            content = {}
            if marker is not None and marker["Size"]:
                body = self._call("reading the marker of", self.client.get_object,
                                  Bucket=self.bucket, Key=marker["Key"])["Body"].read()
                content = parse_marker(body)
            found.append(Published(model, version, marker is not None, _fingerprint(items),
                                   tuple(sorted(o["rel"] for o in objs if o["rel"] != MARKER)),
                                   content))
        return found

    def fetch(self, published: Published, dest: Path) -> None:
        base = f"{self.prefix}{published.model}/{published.version}/"
        for rel in published.files:
            self._call("downloading from", self.client.download_file, Bucket=self.bucket,
                       Key=base + rel, Filename=str(safe_target(dest, rel)))


def open_source(source: str, endpoint_url: str | None = None) -> FolderSource | BucketSource:
    if source.startswith("s3://"):
        return BucketSource(source, endpoint_url)
    if "://" in source:
        raise SourceError(f"{source!r}: a watched source is a folder or s3://BUCKET/PREFIX")
    return FolderSource(Path(source))
