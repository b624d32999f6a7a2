"""Ed25519 signed checkpoints of the audit chain (record count + head hash), with a key kept outside the home."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pipelines.errors import GalleryMatchError, Refused


class Home(Protocol):
    """What signing needs of a home (a `pipelines.storage.Storage`): its URI and what lies inside it."""

    @property
    def uri(self) -> str: ...

    def contains(self, location: str | Path) -> bool: ...


PRIVATE = "audit-signing-key.pem"
PUBLIC = "audit-signing-key.pub"


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the chain of `home` had `count` records ending in `head_hash`."""

    home: str
    count: int
    head_hash: str
    time: str
    public_key: str  # raw Ed25519 public key, hex
    signature: str = ""  # hex, over `payload()`

    def payload(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as exc:
            raise Refused(f"not a gallerymatch audit checkpoint: {exc}") from exc

    def valid(self) -> bool:
        """The signature verifies under the key the checkpoint names."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.public_key)).verify(
                bytes.fromhex(self.signature), self.payload()
            )
            return True
        except (InvalidSignature, ValueError):
            return False


@dataclass(frozen=True)
class Signer:
    """The deployment's signing key; generated at first use when the key folder has none."""

    key_dir: Path
    private: Any

    @property
    def public_hex(self) -> str:
        from cryptography.hazmat.primitives import serialization

        raw = self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return str(raw.hex())

    def sign(self, home: str, count: int, head_hash: str) -> Checkpoint:
        now = dt.datetime.now(dt.UTC).isoformat()
        unsigned = Checkpoint(home, count, head_hash, now, self.public_hex)
        return Checkpoint(**(asdict(unsigned) | {"signature": self.private.sign(unsigned.payload()).hex()}))


def check_key_dir(key_dir: Path, home: Home) -> Path:
    """The key must not live beside the log it protects: refuse a key folder inside the home."""
    key_dir = key_dir.expanduser().resolve()
    if home.contains(key_dir):
        raise Refused(
            f"the audit signing key folder {key_dir} is inside GALLERYMATCH_HOME {home.uri}: whoever can "
            "rewrite the log could then re-sign it. Set GALLERYMATCH_AUDIT_KEY_DIR to a folder outside the home."
        )
    return key_dir


def load_signer(key_dir: Path) -> Signer:
    """Read the private key, creating it (mode 0600) at first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = key_dir / PRIVATE
    if not path.exists():
        _create_key(key_dir)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise GalleryMatchError(f"the audit signing key {path} cannot be read ({exc}); restore it from backup") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise GalleryMatchError(f"{path} is not an Ed25519 private key")
    if not (key_dir / PUBLIC).exists():
        _publish(key_dir)  # a first use that died between the two files: without it no checkpoint verifies
    return Signer(key_dir, key)


def public_key_hex(key_dir: Path) -> str | None:
    """The deployment's public key (hex), or None when no key was ever made here."""
    path = key_dir / PUBLIC
    return path.read_text().strip() if path.exists() else None


def _create_key(key_dir: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = key_dir / f".{PRIVATE}.{uuid.uuid4().hex}"  # one per caller: threads of one process share a pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, key_dir / PRIVATE)  # two first uses at once: one key wins, the other is discarded
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _publish(key_dir: Path) -> None:
    """Write the public key of whichever private key won, for verifiers who hold only the public half."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((key_dir / PRIVATE).read_bytes(), password=None)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    tmp = key_dir / f".{PUBLIC}.{uuid.uuid4().hex}"
    tmp.write_text(raw.hex() + "\n")
    try:
        os.link(tmp, key_dir / PUBLIC)  # appears whole: a verifier never reads a half-written key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def home_tag(home: str) -> str:
    """A short stable name for a home, for its witness folder under the key folder."""
    return hashlib.sha256(home.encode()).hexdigest()[:24]
