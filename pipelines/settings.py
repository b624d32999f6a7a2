"""The one typed settings tree (env prefix GALLERYMATCH_), read once at the entry point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipelines.objectstore import ObjectStore
from pipelines.storage import Storage

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class Settings(BaseSettings):
    """Everything configurable; library functions receive plain values taken from here."""

    model_config = SettingsConfigDict(env_prefix="GALLERYMATCH_", extra="ignore")

    home: str = Field(
        ".gallerymatch",
        description="root of everything gallerymatch keeps: a local folder or an s3://bucket/prefix URI "
        "(credentials, region and endpoint from the standard AWS_* variables)",
    )
    models_dir: Path | None = Field(None, description="model weights are looked up here first (default: HOME/models)")
    model_downloads: bool = Field(True, description="let the libraries download weights when not found locally")

    face_model: str = "facenet-casia-webface"  # trained weights install offline (`models install`)
    image_model: str = "ViT-B-32/laion2b_s34b_b79k"
    face_min_size: int = Field(20, ge=8, description="MTCNN minimum face size in pixels")
    face_min_prob: float = Field(0.90, ge=0.0, le=1.0, description="faces below this detection probability are dropped")
    detect_max_side: int = Field(1280, ge=160, description="images are downscaled to this longest side for detection")

    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(60_000_000, ge=1)
    allowed_formats: Annotated[tuple[str, ...], NoDecode] = DEFAULT_FORMATS

    rows_per_shard: int = Field(256, ge=1)
    face_batch_size: int = Field(32, ge=1, description="face crops per InceptionResnetV1 forward pass")
    image_batch_size: int = Field(16, ge=1, description="images per open_clip forward pass")
    detect_batch_size: int = Field(8, ge=1, description="equal-size images per MTCNN call")
    shards_per_model_batch: int = Field(1, ge=1, description="Ray Data batch size of the model stage, in shards")
    model_threads: int | None = Field(
        None, ge=1, description="torch threads of the Ray model actor on CPU (default: every core of its node)"
    )

    watchlist_default_days: int = Field(90, ge=1, description="expiry of a watchlist submitted without --expires")
    watchlist_max_days: int = Field(365, ge=1, description="the latest expiry a watchlist may ask for")
    default_top_k: int = Field(50, ge=1, le=10_000)
    default_threshold: float = Field(0.5, ge=-1.0, le=1.0, description="cosine score flagged above_threshold")
    match_block_rows: int = Field(16_384, ge=1, description="gallery vectors per matrix product")

    audit_key_dir: Path | None = Field(
        None,
        description="the audit signing key and the witness of each home's chain; must be outside the home "
        "(default: $XDG_CONFIG_HOME/gallerymatch, else ~/.config/gallerymatch)",
    )
    lock_ttl_s: float = Field(120.0, ge=5.0, description="a writer lease not renewed for this long is stale")
    lock_wait_s: float = Field(900.0, ge=0.0, description="how long a writer waits for another writer to finish")
    erase_versioned_bucket: Literal["purge-versions", "refuse"] = Field(
        "purge-versions",
        description="an s3 home on a bucket with object versioning (Enabled or Suspended) keeps deleted and "
        "overwritten bytes as noncurrent versions: 'purge-versions' lets erase permanently delete every noncurrent "
        "version and delete marker under the home's lance/, results/, manifests/, staging/ and erasure/journal/ "
        "areas (retention: under lance/probes.lance/, results/ and manifests/); the bucket's history of those areas "
        "is lost, audit/ is never touched. 'refuse' makes erase refuse before removing anything, and retention "
        "leave (and report) the versions for the bucket's lifecycle rules to expire",
    )
    closed_probe_grace_days: int = Field(
        30, ge=0, le=365, description="a closed watchlist's probe vectors are erased this long after closing"
    )

    actor: str = Field("operator", description="opaque id recorded in the audit trail when a command has no requester")
    results_retention_days: int = Field(365, ge=1, description="result sets older than this are deleted")
    audit_retention_days: int = Field(400, ge=183, description="audit records are kept at least 183 days")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray_address: str | None = Field(None, description="Ray cluster address; a local Ray is started when unset")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs for the local Ray (default: all)")

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip().upper() for part in value.split(",") if part.strip())
        return value

    @field_validator("home", mode="before")
    @classmethod
    def _home_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @property
    def storage(self) -> Storage:
        """The one storage seam of this home (built from the home and the AWS_* variables)."""
        cached: Storage | None = self.__dict__.get("_storage")
        if cached is None or cached.uri != _normal(self.home):
            cached = Storage.at(self.home)
            self.__dict__["_storage"] = cached
        return cached

    @property
    def store(self) -> ObjectStore:
        """The home as an object store: the interface every commit protocol writes through."""
        return self.storage.store

    @property
    def home_uri(self) -> str:
        return self.storage.uri

    @property
    def local_home(self) -> Path:
        """The home folder of a local home (refused for an s3:// home)."""
        return self.storage.local_root

    @property
    def resolved_audit_key_dir(self) -> Path:
        from pipelines.signing import check_key_dir

        if self.audit_key_dir is not None:
            folder = self.audit_key_dir
        else:
            config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
            folder = Path(config) / "gallerymatch"
        return check_key_dir(folder, self.storage)

    @property
    def resolved_models_dir(self) -> Path:
        if self.models_dir is not None:
            return self.models_dir
        if self.storage.is_s3:  # weights are read from a local folder, never from the home's bucket
            config = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            return Path(config) / "gallerymatch" / "models"
        return self.storage.local_root / "models"


def _normal(home: str) -> str:
    return home.rstrip("/") if home.startswith("s3://") else str(Path(home).expanduser().resolve())


def load_settings() -> Settings:
    """Read the environment once; call only from entry points."""
    return Settings()
