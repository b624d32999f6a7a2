"""The ingest benchmark's reference figures (the stage bound and the job size that reaches the target), and the
S3 request tally both benchmarks count a loopback moto server's requests with."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import bench_ingest as bench


def results(stage1: float, stage2: float, device: str) -> bench.Results:
    res = bench.Results(device=device)
    res.rows["prepare"] = bench.Row("stage 1", int(stage1 * 10), 10.0)
    res.rows["embed"] = bench.Row("stage 2", int(stage2 * 10), 10.0)
    return res


def test_stage_bound_on_shared_cores_is_both_stages_back_to_back() -> None:
    # 20 img/s and 30 img/s on the same cores: 1/20 + 1/30 s of work per image -> 12 img/s
    assert bench.stage_bound(results(20, 30, "cpu")) == pytest.approx(12.0)


def test_stage_bound_with_the_model_stage_on_a_gpu_is_the_slowest_stage() -> None:
    assert bench.stage_bound(results(20, 30, "cuda")) == pytest.approx(20.0)


def test_break_even_job_size_reaches_the_target_rate() -> None:
    startup, steady, target = 30.0, 10.0, 7.0
    images = float(bench.break_even(target, startup, steady).replace(",", ""))
    assert images / (startup + images / steady) == pytest.approx(target, rel=1e-3)
    smaller = images * 0.9
    assert smaller / (startup + smaller / steady) < target
    assert bench.break_even(10.0, startup, steady) == "never"


def test_ratio_table_flags_the_target_per_engine() -> None:
    res = results(20, 30, "cpu")
    res.rows["e2e_local"] = bench.Row("local", 100, 10.0)  # 10 img/s against a bound of 12: 0.83
    res.rows["e2e_ray"] = bench.Row("ray", 60, 10.0)  # 6 img/s: 0.50
    (local, ray) = bench.ratios(res)
    assert local[0] == "local" and local[6] == "0.83 (met)"
    assert ray[0] == "ray" and ray[6] == "0.50 (NO)"


def test_s3_requests_are_named_by_operation() -> None:
    op = bench.s3_operation
    assert op("GET", "/bkt", "list-type=2&prefix=home%2Flance%2F", {}) == ("ListObjectsV2", "home/lance/")
    assert op("GET", "/bkt", "uploads&prefix=home%2Fresults%2F", {}) == ("ListMultipartUploads", "home/results/")
    assert op("GET", "/bkt/home/a%3Db/x.lance", "", {"HTTP_RANGE": "bytes=0-9"}) == (
        "GetObject (range)",
        "home/a=b/x.lance",
    )
    assert op("GET", "/bkt/k", "", {}) == ("GetObject", "k")
    assert op("HEAD", "/bkt/k", "", {}) == ("HeadObject", "k")
    assert op("PUT", "/bkt/k", "", {"HTTP_IF_NONE_MATCH": "*"}) == ("PutObject (If-None-Match)", "k")
    assert op("PUT", "/bkt/k", "partNumber=2&uploadId=u", {}) == ("UploadPart", "k")
    assert op("POST", "/bkt", "delete", {}) == ("DeleteObjects", "")
    assert op("DELETE", "/bkt/k", "", {}) == ("DeleteObject", "k")
    assert op("PUT", "/bkt", "", {}) == ("CreateBucket", "")
    kinds = [bench.request_kind(name) for name in ("ListObjectsV2", "GetObject (range)", "UploadPart", "HeadBucket")]
    assert kinds == ["LIST", "GET range", "PUT", "other"]


def test_traffic_groups_requests_by_area() -> None:
    def request(op: str, key: str, sent: int = 0, whole: int = 0) -> bench.S3Request:
        return bench.S3Request(0.0, 0.5, op, key, sent, 0, whole or sent, 200)

    requests = [
        request("GetObject (range)", "home/lance/faces.lance/data/f.lance", 10, 1000),
        request("ListObjectsV2", "home/lance/faces.lance/_versions/", 300),
        request("ListObjectsV2", "home/lance/", 200),
        request("GetObject (range)", "shards/source_id=bench/shard-1.parquet", 50, 60),
        request("PutObject (If-None-Match)", "home/audit/records/00000000/000000000001.json"),
    ]
    by_area = bench.traffic_by(requests, bench.area_of)
    assert sorted(by_area) == ["audit", "lance/ (the table names)", "lance/faces.lance", "shards (Parquet)"]
    faces = by_area["lance/faces.lance"]
    assert faces.kinds == {"GET range": 1, "LIST": 1} and faces.requests == 2
    assert (faces.sent, faces.whole, faces.busy) == (310, 1000, 1.0)  # `whole` counts ranged GETs only
    total = bench.total_traffic(requests)
    assert total.requests == 5 and total.kinds["LIST"] == 2 and total.kinds["PUT"] == 1


def test_loopback_s3_counts_what_a_client_sends_and_restores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with bench.loopback_s3() as s3:
        assert s3.endpoint.startswith("http://127.0.0.1:")
        assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
        bucket, client = s3.bucket(), s3.client()
        mark = s3.tally.mark()
        client.put_object(Bucket=bucket, Key="a/b.bin", Body=b"x" * 1000)
        assert client.get_object(Bucket=bucket, Key="a/b.bin", Range="bytes=10-19")["Body"].read() == b"x" * 10
        client.list_objects_v2(Bucket=bucket, Prefix="a/")
        seen = s3.tally.since(mark)  # taken as soon as the client is done: nothing may be missing
        assert [(r.op, r.key) for r in seen] == [
            ("PutObject", "a/b.bin"),
            ("GetObject (range)", "a/b.bin"),
            ("ListObjectsV2", "a/"),
        ]
        assert (seen[0].received, seen[1].sent, seen[1].whole, seen[1].status) == (1000, 10, 1000, 206)
        assert s3.stored_bytes(bucket, "a/") == 1000
        s3.drop(bucket)
    assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
