"""The one storage seam: where each area of a home lives, how to reach it, and which filesystem reads it.

A home is a local folder or an `s3://bucket/prefix` URI. `Storage` is built once from settings and gives:

- `store`: the `ObjectStore` every commit protocol writes through (create-if-absent, read, list, delete);
- `fs` / `fs_path(key)`: a `pyarrow.fs` filesystem for bulk Parquet (result parts, shards), which Polars,
  Lance and Ray Data also take. pyarrow.fs rather than fsspec: it is already what Parquet, Lance and Ray
  Data read through, its S3 client is native (no extra asyncio stack), and a `FileSystem` pickles, so a Ray
  worker gets a URI and opens it itself;
- `lance_uri` / `lance_options`: where the LanceDB tables are and the `storage_options` Lance needs;
- `polars_options`: the `storage_options` a data team passes to `pl.scan_parquet` for this home.

Credentials, region and a custom endpoint come only from the standard AWS variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`); no
config file, profile or instance metadata is consulted, and plain `http://` is used only when it is the
endpoint the user set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipelines.errors import Refused
from pipelines.objectstore import LocalStore, ObjectStore

# The areas of a home (keys under its root). Every module names an area through these constants.
LANCE = "lance"
RESULTS = "results"
MANIFESTS = "manifests"
STAGING = "staging"
AUDIT = "audit"
ERASURE = "erasure"
LOCKS = "locks"
AREAS = (LANCE, RESULTS, MANIFESTS, STAGING, AUDIT, ERASURE, LOCKS)


@dataclass(frozen=True)
class S3Config:
    """What it takes to reach an S3 API, read from the standard AWS variables only."""

    access_key: str
    secret_key: str
    region: str
    endpoint: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Config:
        env = os.environ if environ is None else environ
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise Refused(
                "an s3:// location needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(and AWS_REGION; AWS_ENDPOINT_URL for an S3-compatible store)"
            )
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if endpoint is not None:
            parsed = urlparse(endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise Refused(f"AWS_ENDPOINT_URL must be an http(s)://host[:port] URL, got {endpoint!r}")
            endpoint = f"{parsed.scheme}://{parsed.netloc}"
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return cls(access, secret, region, endpoint, env.get("AWS_SESSION_TOKEN") or None)

    @property
    def allow_http(self) -> bool:
        """Plain HTTP only towards an endpoint the user named explicitly."""
        return self.endpoint is not None and self.endpoint.startswith("http://")

    def __repr__(self) -> str:  # never print a secret
        return f"S3Config(region={self.region!r}, endpoint={self.endpoint!r})"

    def client(self) -> Any:
        return _client(self)

    def filesystem(self) -> Any:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "session_token": self.session_token,
            "region": self.region,
            "check_directory_existence_before_creation": False,
        }
        if self.endpoint is not None:
            parsed = urlparse(self.endpoint)
            kwargs |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
        return pafs.S3FileSystem(**kwargs)

    def lance_options(self) -> dict[str, str]:
        return self._options(endpoint_key="aws_endpoint", http_key="allow_http")

    def polars_options(self) -> dict[str, str]:
        return self._options(endpoint_key="aws_endpoint_url", http_key="aws_allow_http")

    def _options(self, endpoint_key: str, http_key: str) -> dict[str, str]:
        """The object_store-style options Lance and Polars both take; they name the endpoint keys differently."""
        options = {
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "aws_region": self.region,
        }
        if self.session_token:
            options["aws_session_token"] = self.session_token
        if self.endpoint is not None:
            options[endpoint_key] = self.endpoint
        if self.allow_http:
            options[http_key] = "true"
        return options


_CLIENTS: dict[S3Config, Any] = {}


def _client(config: S3Config) -> Any:
    """One boto3 client per configuration and process (clients are thread-safe; they do not pickle)."""
    client = _CLIENTS.get(config)
    if client is None:
        import boto3
        import botocore.session
        from botocore.config import Config

        core = botocore.session.Session()
        for variable in ("config_file", "credentials_file"):  # no ~/.aws files: only the AWS_* variables count
            core.set_config_variable(variable, os.devnull)
        # AWS_PROFILE naming a profile of the ignored files would fail every request: no profile at all (None as a
        # session variable means "unset" to botocore, which then reads AWS_PROFILE; an override is kept as None)
        core.get_component("config_store").set_config_variable("profile", None)
        session = boto3.session.Session(
            botocore_session=core,
            aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret_key,
            aws_session_token=config.session_token,
            region_name=config.region,
        )
        client = session.client(
            "s3",
            endpoint_url=config.endpoint,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                max_pool_connections=32,
                s3={"addressing_style": "path"} if config.endpoint else {},
            ),
        )
        _CLIENTS[config] = client
    return client


def is_s3(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ('bucket', 'some/prefix'); refuses what is not a usable bucket URI."""
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if parsed.scheme != "s3" or len(bucket) < 3 or parsed.query or parsed.fragment:
        raise Refused(f"not an s3://bucket/prefix location: {uri!r}")
    if any(p in (".", "..") for p in prefix.split("/")):
        raise Refused(f"an s3 location may not contain '.' or '..' segments: {uri!r}")
    return bucket, prefix


@dataclass(frozen=True)
class Storage:
    """A home: its normalised URI (absolute path or s3://bucket/prefix) and, for S3, how to reach it."""

    uri: str
    s3: S3Config | None = None

    @classmethod
    def at(cls, location: str | Path, environ: Mapping[str, str] | None = None) -> Storage:
        text = str(location)
        if is_s3(text):
            bucket, prefix = split_s3(text)
            return cls(f"s3://{bucket}/{prefix}".rstrip("/"), S3Config.from_env(environ))
        if "://" in text:
            raise Refused(f"GALLERYMATCH_HOME must be a local path or an s3:// URI, got {text!r}")
        return cls(str(Path(text).expanduser().resolve()))

    @property
    def is_s3(self) -> bool:
        return self.s3 is not None

    @property
    def local_root(self) -> Path:
        """The home folder; only for a local home (S3 homes have no path)."""
        if self.s3 is not None:
            raise Refused(f"{self.uri} is on object storage, not a local folder")
        return Path(self.uri)

    @cached_property
    def store(self) -> ObjectStore:
        if self.s3 is None:
            return LocalStore(Path(self.uri))
        from pipelines.s3store import S3Store

        bucket, prefix = split_s3(self.uri)
        return S3Store(self.s3, bucket, prefix)

    @cached_property
    def fs(self) -> Any:
        """The pyarrow filesystem of this home (paths from `fs_path`)."""
        if self.s3 is None:
            import pyarrow.fs as pafs

            return pafs.LocalFileSystem()
        return self.s3.filesystem()

    def fs_path(self, key: str = "") -> str:
        """`key` (relative, '/'-separated) as a path of `fs`: /abs/home/key locally, bucket/prefix/key on S3."""
        base = self.uri.removeprefix("s3://")
        return f"{base}/{key.strip('/')}" if key.strip("/") else base

    def uri_of(self, key: str = "") -> str:
        return f"{self.uri}/{key.strip('/')}" if key.strip("/") else self.uri

    @property
    def lance_uri(self) -> str:
        return self.uri_of(LANCE)

    @property
    def lance_options(self) -> dict[str, str]:
        return self.s3.lance_options() if self.s3 is not None else {}

    @property
    def polars_options(self) -> dict[str, str] | None:
        return self.s3.polars_options() if self.s3 is not None else None

    def contains(self, location: str | Path) -> bool:
        """Whether `location` (a path or URI) lies inside this home (exports and keys must not)."""
        text = str(location)
        if is_s3(text):
            if self.s3 is None:
                return False
            bucket, prefix = split_s3(text)
            mine = self.uri.removeprefix("s3://")
            target = f"{bucket}/{prefix}".rstrip("/")
            return target == mine or target.startswith(mine + "/")
        if self.s3 is not None:
            return False
        path, root = Path(text).expanduser().resolve(), Path(self.uri)
        return path == root or root in path.parents


def filesystem_for(location: str | Path, environ: Mapping[str, str] | None = None) -> tuple[Any, str]:
    """A pyarrow filesystem and path for a location outside the home (shards folders, exports)."""
    text = str(location)
    if is_s3(text):
        bucket, prefix = split_s3(text)
        return S3Config.from_env(environ).filesystem(), f"{bucket}/{prefix}".rstrip("/")
    if "://" in text:
        raise Refused(f"a location must be a local path or an s3:// URI, got {text!r}")
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
