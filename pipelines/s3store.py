"""`ObjectStore` on S3: create-if-absent is `PutObject` with `If-None-Match: *` (what Lance commits with too).

A PUT is atomic on S3 (an object appears whole or not at all), so there is no temporary file to clean up;
what a crashed writer can leave is an unfinished multipart upload, which `drop_incomplete` aborts. Listing
is one `ListObjectsV2` page per 1000 keys (never a request per object), and bulk deletes go 1000 at a time.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipelines.errors import GalleryMatchError
from pipelines.storage import S3Config

CONFLICT_RETRIES = 8


class S3Error(GalleryMatchError):
    """The object store refused or failed a request; nothing was committed by it."""


@dataclass(frozen=True)
class ObjectVersion:
    key: str  # relative to the store's root
    version_id: str
    is_latest: bool
    delete_marker: bool
    size: int


@dataclass(frozen=True)
class S3Store:
    """An `ObjectStore` on `s3://bucket/prefix`."""

    config: S3Config
    bucket: str
    prefix: str  # no leading or trailing '/'

    @property
    def client(self) -> Any:
        return self.config.client()

    def _key(self, key: str) -> str:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"not a valid object key: {key!r}")
        return "/".join([self.prefix, *parts]) if self.prefix else "/".join(parts)

    def _base(self, prefix: str) -> str:
        inner = "/".join(p for p in prefix.split("/") if p)
        joined = "/".join(x for x in (self.prefix, inner) if x)
        return f"{joined}/" if joined else ""

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    @contextmanager
    def _reaching(self, what: str, refusals: bool = True) -> Iterator[None]:
        """A store that cannot be reached (no route, refused, timed out after botocore's retries, a bad proxy), or
        that refuses (`refusals`: no such bucket, access denied), is one line naming the bucket and where it was
        sought, not an unexpected exception from deep inside botocore."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.config.endpoint or f"AWS S3 (region {self.config.region}, https)"
        try:
            yield
        except BotoCoreError as exc:
            raise S3Error(f"could not {what} s3://{self.bucket}/{self.prefix}: {where} is unreachable ({exc})") from exc
        except ClientError as exc:
            if not refusals:
                raise
            code, status = _error(exc)
            raise S3Error(
                f"could not {what} s3://{self.bucket}/{self.prefix} at {where}: {code} (HTTP {status})"
            ) from exc

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)
        for attempt in range(CONFLICT_RETRIES):
            try:
                with self._reaching("write to", refusals=False):
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code, status = _error(exc)
                if status == 412 or code == "PreconditionFailed":
                    return False
                if status == 409 or code == "ConditionalRequestConflict":  # another create of it is in flight
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise S3Error(f"could not write {self.location(key)}: {code} (HTTP {status})") from exc
        return self.read(key) is None and self.create(key, data)

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            with self._reaching("read from", refusals=False):
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
                try:
                    return bytes(body.read())
                finally:
                    body.close()
        except ClientError as exc:
            code, status = _error(exc)
            if status == 404 or code in ("NoSuchKey", "NotFound"):
                return None
            raise S3Error(f"could not read {self.location(key)}: {code} (HTTP {status})") from exc

    def _pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._reaching("list"):
            yield from paginator.paginate(Bucket=self.bucket, **kwargs)

    def folders(self, prefix: str) -> list[str]:
        base = self._base(prefix)
        names = [
            common["Prefix"][len(base) :].rstrip("/")
            for page in self._pages(Prefix=base, Delimiter="/")
            for common in page.get("CommonPrefixes", [])
        ]
        return sorted(n for n in names if n)

    def list(self, prefix: str) -> list[str]:
        base = self._base(prefix)
        pages = self._pages(Prefix=base)
        return sorted(self._relative(obj["Key"]) for page in pages for obj in page.get("Contents", []))

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key under `prefix` with its size (one listing)."""
        base = self._base(prefix)
        return {
            self._relative(obj["Key"]): int(obj["Size"])
            for page in self._pages(Prefix=base)
            for obj in page.get("Contents", [])
        }

    def delete(self, key: str) -> None:
        with self._reaching("delete from"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_many(self, keys: builtins.list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._delete_objects(batch)

    def _delete_objects(self, batch: builtins.list[dict[str, str]]) -> None:
        if not batch:
            return
        with self._reaching("delete from"):
            reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        errors = reply.get("Errors") or []
        if errors:
            first = errors[0]
            raise S3Error(f"could not delete {len(errors)} object(s), first {first.get('Key')}: {first.get('Code')}")

    def drop_incomplete(self, prefix: str) -> int:
        """Abort the multipart uploads a crashed writer left under `prefix` (a PUT itself is never torn)."""
        base = self._base(prefix)
        paginator = self.client.get_paginator("list_multipart_uploads")
        dropped = 0
        with self._reaching("tidy"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for upload in page.get("Uploads", []) or []:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    dropped += 1
        return dropped

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    # -- versioning: what erasure needs to know about and remove ------------------------------------------

    def versioning(self) -> str | None:
        """'Enabled', 'Suspended' or None (never enabled): a bucket that ever had versioning keeps old bytes."""
        status = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
        return str(status) if status else None

    def versions(self, prefix: str = "") -> builtins.list[ObjectVersion]:
        """Every version and delete marker under `prefix`."""
        base = self._base(prefix)
        out: builtins.list[ObjectVersion] = []
        paginator = self.client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for v in page.get("Versions", []) or []:
                out.append(
                    ObjectVersion(self._relative(v["Key"]), v["VersionId"], bool(v["IsLatest"]), False, int(v["Size"]))
                )
            for m in page.get("DeleteMarkers", []) or []:
                out.append(ObjectVersion(self._relative(m["Key"]), m["VersionId"], bool(m["IsLatest"]), True, 0))
        return out

    def read_version(self, key: str, version_id: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), VersionId=version_id)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def delete_versions(self, versions: builtins.list[ObjectVersion]) -> None:
        """Permanently remove these versions (a delete with a VersionId leaves no marker and no bytes)."""
        batch = [{"Key": self._key(v.key), "VersionId": v.version_id} for v in versions]
        for start in range(0, len(batch), 1000):
            self._delete_objects(batch[start : start + 1000])


def _error(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status
