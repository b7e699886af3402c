"""Where new model versions are published: a folder, or an S3-compatible bucket prefix.

Layout (the same in both): SOURCE/MODEL/VERSION/ holds either one built archive (*.mar) or a
servetool model folder (servetool.yaml and the files it names), and a marker file READY.

A version counts as published only once its READY marker exists, written last by the publisher.
Why a marker and not an atomic rename: a bucket has no rename (a "folder" is many objects, each
uploaded on its own), and one rule for both sources is one rule to learn; in a folder, a rename of a
finished MODEL/.tmp-VERSION to MODEL/VERSION works too, as long as READY is inside it. The marker
may carry the archive's SHA-256 (`{"sha256": "..."}`), checked before anything is loaded.

A version's fingerprint (names, sizes and mtimes or ETags of everything under it) is what the
watcher remembers: a version is handled again when it changes. Its upload stamp (the newest ctime
in a folder, the newest LastModified in a bucket) changes whenever it is written again, even with
the same bytes (`cp -p`, the same ETag): a failed version is tried again then too.

Symbolic links are refused, never followed: a model folder, a version folder or a file in one that
is a link is reported (Published.refused, which the watcher shows as the version's event) and
nothing behind it is read; fetching opens each path component without following links
(O_NOFOLLOW), so a link swapped in between the listing and the copy is refused as well.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from servetool.errors import ServetoolError, whole_cause

MARKER = "READY"
SPEC_FILE = "servetool.yaml"


MODEL_FOLDER = "*"  # the `version` of a refused model folder (no version of it is read)


class SourceError(ServetoolError):
    """`transient`: why it may pass by itself (the store unreachable, throttling), else ''."""

    def __init__(self, message: str, transient: str = "") -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Published:
    model: str
    version: str
    complete: bool  # its READY marker is there
    fingerprint: str
    files: tuple[str, ...] = field(default=(), compare=False)  # relative to the version folder
    marker: dict[str, Any] = field(default_factory=dict, compare=False)
    uploaded: str = field(default="", compare=False)  # changes with every upload, same bytes too
    refused: str = field(default="", compare=False)  # why it is not read at all (a symbolic link)

    @property
    def kind(self) -> str:
        """'archive', 'folder', or why neither."""
        if self.refused:
            return self.refused
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


def _link_refusal(path: Path, what: str) -> str:
    try:
        to = os.readlink(path)
    except OSError:
        to = "?"
    return (f"{what} {path} is a symbolic link (to {to}): refused, the watcher reads only real "
            "folders and regular files in a watched folder (a link could serve files from "
            "anywhere); publish a copy instead")


def _link_fingerprint(path: Path) -> str:
    try:
        info = path.lstat()
        return _fingerprint([(os.readlink(path), str(info.st_mtime_ns), str(info.st_ctime_ns))])
    except OSError:
        return _fingerprint([])


class FolderSource:
    default_interval_s = 2.0  # a directory listing costs nothing

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = str(self.root)

    def scan(self) -> list[Published]:
        if not self.root.is_dir():
            raise SourceError(f"the watched folder {self.root} does not exist")
        found = []
        for model_dir in sorted(self.root.iterdir()):
            if model_dir.name.startswith("."):
                continue
            if model_dir.is_symlink():
                if model_dir.is_dir():  # a link to a file is no model folder: left alone
                    found.append(Published(model_dir.name, MODEL_FOLDER, True,
                                           _link_fingerprint(model_dir),
                                           refused=_link_refusal(model_dir, "the model folder")))
                continue
            if not model_dir.is_dir():
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if version_dir.name.startswith("."):  # a publisher's temporary folder
                    continue
                if version_dir.is_symlink():
                    if version_dir.is_dir():
                        found.append(Published(
                            model_dir.name, version_dir.name, True, _link_fingerprint(version_dir),
                            refused=_link_refusal(version_dir, "the version folder")))
                    continue
                if version_dir.is_dir():
                    found.append(self._version(model_dir.name, version_dir))
        return found

    def _version(self, model: str, version_dir: Path) -> Published:
        """One version folder, read with lstat: a link anywhere in it refuses the whole version
        (skipping it could turn a linked archive into 'no archive', or serve half a folder)."""
        files: list[str] = []
        items: list[tuple[str, ...]] = []
        refused = ""
        uploaded = version_dir.lstat().st_ctime_ns  # a rename of .VERSION to VERSION counts too
        pending = [version_dir]
        while pending:
            folder = pending.pop()
            for path in sorted(folder.iterdir()):
                info = path.lstat()
                rel = path.relative_to(version_dir).as_posix()
                if stat.S_ISLNK(info.st_mode):
                    refused = refused or _link_refusal(path, "the file")
                    items.append((rel, "link", str(info.st_mtime_ns)))
                elif stat.S_ISDIR(info.st_mode):
                    pending.append(path)
                elif stat.S_ISREG(info.st_mode):
                    items.append((rel, str(info.st_size), str(info.st_mtime_ns)))
                    uploaded = max(uploaded, info.st_ctime_ns)
                    if rel != MARKER:
                        files.append(rel)
        marker = version_dir / MARKER
        complete = marker.is_file() and not marker.is_symlink()
        content = parse_marker(marker.read_bytes()) if complete and not refused else {}
        return Published(model, version_dir.name, complete, _fingerprint(items),
                         tuple(sorted(files)), content, str(uploaded), refused)

    def fetch(self, published: Published, dest: Path) -> None:
        """A copy of the version folder (the publisher may change the source meanwhile), each
        file opened without following a link in any part of its path."""
        if published.refused:
            raise SourceError(published.refused)
        for rel in published.files:
            parts = [published.model, published.version, *rel.split("/")]
            with open(self._open_beneath(parts), "rb") as src, \
                    open(safe_target(dest, rel), "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)

    def _open_beneath(self, parts: list[str]) -> int:
        """A descriptor of root/parts..., each component opened relative to the one before with
        O_NOFOLLOW: a symbolic link anywhere below the watched folder is refused, not followed."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
                try:
                    nxt = os.open(part, flags, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise SourceError(_link_refusal(self.root.joinpath(*parts[:i + 1]),
                                                        "the path")) from None
                    raise
                os.close(fd)
                fd = nxt
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SourceError(f"{self.root.joinpath(*parts)} is not a regular file: refused")
            return fd
        except BaseException:
            os.close(fd)
            raise


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
                              f"{whole_cause(exc)}", transient=bucket_transient(exc)) from None

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
            # the same bytes uploaded again keep their ETag: LastModified says it was uploaded
            uploaded = max(str(o.get("LastModified", "")) for o in objs)
            found.append(Published(model, version, marker is not None, _fingerprint(items),
                                   tuple(sorted(o["rel"] for o in objs if o["rel"] != MARKER)),
                                   content, uploaded))
        return found

    def fetch(self, published: Published, dest: Path) -> None:
        base = f"{self.prefix}{published.model}/{published.version}/"
        for rel in published.files:
            self._call("downloading from", self.client.download_file, Bucket=self.bucket,
                       Key=base + rel, Filename=str(safe_target(dest, rel)))


# S3 error codes that say "later", not "never" (throttling, a store that is briefly unwell)
TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                      "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError",
                      "RequestLimitExceeded", "TooManyRequests", "ProvisionedThroughputExceeded"}


def bucket_transient(exc: BaseException) -> str:
    """Why a boto3/botocore failure may pass by itself ('' when it will not: a missing bucket,
    refused credentials, a missing object)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return "the bucket did not answer in time"
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, BotoConnectionError)):
        return "the bucket could not be reached"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if error.get("Code") in TRANSIENT_S3_CODES or int(status) >= 500 or int(status) == 429:
            return f"the bucket answered {status} {error.get('Code', '')}".strip()
    return ""


def open_source(source: str, endpoint_url: str | None = None) -> FolderSource | BucketSource:
    if source.startswith("s3://"):
        return BucketSource(source, endpoint_url)
    if "://" in source:
        raise SourceError(f"{source!r}: a watched source is a folder or s3://BUCKET/PREFIX")
    return FolderSource(Path(source))
