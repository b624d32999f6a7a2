"""A real S3 API for tests: moto's server on 127.0.0.1 and a free port, buckets made per test."""

from __future__ import annotations

import logging
import socket
import uuid
from typing import Any

ACCESS = "gallerymatch-test"
SECRET = "gallerymatch-test-secret"
REGION = "us-east-1"


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def aws_env(endpoint: str) -> dict[str, str]:
    assert endpoint.startswith("http://127.0.0.1:"), "tests only ever talk to loopback"
    return {
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }


def client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def make_bucket(env: dict[str, str], versioned: bool = False) -> str:
    name = f"gm-{uuid.uuid4().hex[:16]}"
    s3 = client(env)
    s3.create_bucket(Bucket=name)
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name
