"""`gallerymatch serve`: reviewers see a run's sheet in a browser and record decisions under the id the deployment
gives them (a bearer token, a login cookie, or a trusted proxy header), never one the page sends.

A run is built cheaply from imported vectors (no images: the crops are placeholders). The server runs in a thread
on 127.0.0.1, port 0; requests go through http.client (no redirect following), and one page load goes through
a real headless chromium."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import FLAGS, RUN_TIMEOUT_S, ensure_chromium
from conftest import make_settings, register

from jobs import serve
from jobs.import_embeddings import run_import
from jobs.match import run_match
from jobs.watchlist import Submission, submit
from lance_tables.reviews import REVIEW_INPUTS, effective_statuses
from lance_tables.store import Gallery
from pipelines.audit import AuditLog
from pipelines.errors import Refused
from pipelines.results import load_run
from pipelines.settings import Settings
from pipelines.sheet import DECISIONS, NOTICE, card_anchor

ROOT = Path(__file__).parents[1]
DIM = 16
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef00"}
SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


@dataclass
class World:
    settings: Settings
    root: Path
    run_id: str
    rows: list[dict[str, Any]]


def _vectors(path: Path, column: str, ids: list[str], vectors: np.ndarray) -> Path:
    columns: dict[str, Any] = {column: ids, "embedding": [list(v) for v in vectors]}
    if column == "record_id":
        columns["minor"] = [False] * len(ids)
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("serve-world")
    settings = make_settings(root / "home")
    register(settings)
    rng = np.random.default_rng(5)
    gallery = rng.choice([-1.0, 1.0], size=(12, DIM))
    records = [f"rec-{i:02d}" for i in range(12)]
    run_import(
        settings, _vectors(root / "gallery.parquet", "record_id", records, gallery), "archive", "m", "image", DIM
    )
    probes = _vectors(root / "probes.parquet", "probe_id", ["p1", "p2"], gallery[[2, 7]])
    sub = Submission(probes, "serve test", "CASE-5", "fraud-investigation", "basis", "analyst-1", "image", "m", 3)
    run = run_match(settings, str(submit(settings, sub)["watchlist_id"]))
    rows = sorted(load_run(settings.store, run["run_id"]).to_pylist(), key=lambda r: (r["probe_id"], r["rank"]))
    return World(settings, root, str(run["run_id"]), rows)


@pytest.fixture
def world(template: World, tmp_path: Path) -> World:
    """A private copy of the home (and its audit key folder) for each test."""
    shutil.copytree(template.root / "home", tmp_path / "home")
    shutil.copytree(template.root / "home-audit-keys", tmp_path / "home-audit-keys")
    return World(make_settings(tmp_path / "home"), tmp_path, template.run_id, template.rows)


def token_file(folder: Path, lines: str, mode: int = 0o600) -> Path:
    path = folder / "tokens.txt"
    path.write_text(lines)
    path.chmod(mode)
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    body = "# reviewers\n\n" + "".join(f"{token} {who}\n" for who, token in TOKENS.items())
    return token_file(tmp_path, body)


def start(settings: Settings, identity: serve.Identity) -> tuple[serve.ReviewServer, threading.Thread]:
    server = serve.make_server(settings, identity, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def server(world: World, tokens: Path) -> Iterator[serve.ReviewServer]:
    srv, thread = start(world.settings, serve.identity_from_options(None, tokens))
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@pytest.fixture
def proxied(world: World) -> Iterator[serve.ReviewServer]:
    srv, thread = start(world.settings, serve.identity_from_options("X-Remote-User", None))
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: str


def call(
    srv: serve.ReviewServer, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Reply:
    host, port = str(srv.server_address[0]), int(srv.server_address[1])
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return Reply(answer.status, answer.headers, answer.read().decode("utf-8", "replace"))
    finally:
        conn.close()


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def page(srv: serve.ReviewServer, run_id: str, headers: dict[str, str]) -> Reply:
    reply = call(srv, "GET", f"/runs/{run_id}", headers=headers)
    assert reply.status == 200, reply.body
    return reply


def csrf_of(html: str) -> str:
    found = set(re.findall(r'name="csrf" value="([^"]+)"', html))
    assert len(found) == 1, found
    return found.pop()


def post(
    srv: serve.ReviewServer, run_id: str, fields: dict[str, str] | list[tuple[str, str]], headers: dict[str, str]
) -> Reply:
    return call(srv, "POST", f"/runs/{run_id}/review", urlencode(fields).encode(), FORM | headers)


def reviews(world: World) -> list[dict[str, Any]]:
    gallery = Gallery(world.settings.storage)
    return gallery.read("reviews").to_pylist() if gallery.open("reviews") is not None else []


def audited(world: World, action: str) -> list[dict[str, Any]]:
    return [r for r in AuditLog.of(world.settings).records() if r["action"] == action]


def status_on_page(html: str, probe_id: str, rank: int) -> str:
    tag = re.search(rf'<article id="{card_anchor(probe_id, rank)}"[^>]*>', html)
    assert tag, (probe_id, rank)
    found = re.search(r'data-review-status="([^"]+)"', tag[0])
    assert found
    return found[1]


def no_traceback(reply: Reply) -> None:
    assert "Traceback" not in reply.body and 'File "' not in reply.body and ".py" not in reply.body


# ------------------------------------------------------------------------------------------------ start-up


def test_refuses_to_start_without_an_identity_mode(tmp_path: Path, tokens: Path) -> None:
    with pytest.raises(Refused, match="identity mode"):
        serve.identity_from_options(None, None)
    with pytest.raises(Refused, match="not both"):
        serve.identity_from_options("X-Remote-User", tokens)
    for bad in ("Authorization", "Cookie", "X Remote", "", "x" * 80):
        with pytest.raises(Refused, match="header name"):
            serve.identity_from_options(bad, None)
    env = os.environ | {
        "GALLERYMATCH_HOME": str(tmp_path / "home"),
        "GALLERYMATCH_AUDIT_KEY_DIR": str(tmp_path / "home-audit-keys"),
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "gallerymatch"), "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "identity mode" in done.stderr and "Traceback" not in done.stderr


def test_a_non_loopback_host_warns_about_tls(
    world: World, tokens: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Stub:
        url = "http://stub/"

        def serve_forever(self) -> None:
            raise KeyboardInterrupt

        def server_close(self) -> None:
            pass

    monkeypatch.setattr(serve, "make_server", lambda *a, **k: Stub())
    identity = serve.identity_from_options(None, tokens)
    serve.run_server(world.settings, identity, "0.0.0.0", 0)
    assert "TLS reverse proxy" in capsys.readouterr().err
    serve.run_server(world.settings, identity, "127.0.0.1", 0)
    out = capsys.readouterr()
    assert "TLS" not in out.err and NOTICE in out.out
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("::ffff:127.0.0.1")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("10.0.0.1") and not serve.is_loopback("x.org")


def test_token_files_are_checked(tmp_path: Path) -> None:
    good = "a" * 16
    cases = {
        f"# c\n\n{good} alice\n{good}x bob extra\n": "line 4: expected 'TOKEN REVIEWER_ID'",
        "short-token alice\n": "line 1: the token is 11 characters",
        f"{good} not/an/id\n": "line 1: reviewer id",
        f"{good} alice\n{good} bob\n": "line 2: the same token is listed twice",
        "# nothing\n\n": "no tokens",
    }
    for body, message in cases.items():
        with pytest.raises(Refused, match=re.escape(message)) as caught:
            serve.load_tokens(token_file(tmp_path, body))
        assert good not in str(caught.value)  # a token is never echoed
    with pytest.raises(Refused, match="chmod 600"):
        serve.load_tokens(token_file(tmp_path, f"{good} alice\n", 0o644))
    with pytest.raises(Refused, match="cannot be read"):
        serve.load_tokens(tmp_path / "absent.txt")
    loaded = serve.load_tokens(token_file(tmp_path, f"  # x\n{good} Alice\n{'b' * 20}\tbob\n"))
    assert loaded.reviewer_of(good) == "alice" and loaded.reviewer_of("b" * 20) == "bob"  # ids normalised
    assert loaded.reviewer_of("a" * 15) is None and loaded.reviewer_of("") is None


# -------------------------------------------------------------------------------------------------- identity


def test_no_identity_no_page_and_nothing_recorded(world: World, server: serve.ReviewServer) -> None:
    run = world.run_id
    anonymous = [
        call(server, "GET", "/"),
        call(server, "GET", f"/runs/{run}"),
        call(server, "GET", f"/runs/{run}", headers={"Authorization": "Bearer " + "x" * 30}),
        call(server, "GET", f"/runs/{run}", headers={"Authorization": "Basic " + TOKENS["alice"]}),
        call(server, "GET", f"/runs/{run}", headers={"Cookie": "gm_session=forged"}),
        call(server, "GET", f"/runs/{run}", headers={"X-Remote-User": "alice"}),  # not this server's mode
        post(server, run, {"probe_id": "p1", "rank": "1", "status": "potential_candidate", "csrf": "x"}, {}),
    ]
    for reply in anonymous:
        assert reply.status == 401, reply.body
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        assert "<article" not in reply.body and "<form" not in reply.body
    assert call(server, "GET", "/login?token=" + "x" * 30).status == 403
    assert call(server, "GET", "/login").status == 400
    assert reviews(world) == [] and audited(world, "results.view") == [] and audited(world, "review") == []


def test_bearer_token_and_login_cookie(
    world: World, server: serve.ReviewServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gallerymatch.serve")
    listed = call(server, "GET", "/", headers=bearer("alice"))
    assert listed.status == 200 and f'href="/runs/{world.run_id}"' in listed.body and "CASE-5" in listed.body
    assert "Reviewing as <strong>alice</strong>" in listed.body
    login = call(server, "GET", "/login?" + urlencode({"token": TOKENS["bob"]}))
    assert login.status == 303 and login.headers["Location"] == "/"
    cookie = login.headers["Set-Cookie"]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {part.strip() for part in cookie.split(";")}
    session = cookie.split(";")[0]
    assert TOKENS["bob"] not in session
    mine = call(server, "GET", "/", headers={"Cookie": session})
    assert mine.status == 200 and "Reviewing as <strong>bob</strong>" in mine.body
    proxied_tls = call(server, "GET", "/login?token=" + TOKENS["bob"], headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in proxied_tls.headers["Set-Cookie"].split("; ")
    onward = call(server, "GET", "/login?" + urlencode({"token": TOKENS["bob"], "next": f"/runs/{world.run_id}"}))
    assert onward.headers["Location"] == f"/runs/{world.run_id}"
    for elsewhere in ("//evil.example/", "https://evil.example/", "/runs/../../x", "javascript:alert(1)"):
        away = call(server, "GET", "/login?" + urlencode({"token": TOKENS["bob"], "next": elsewhere}))
        assert away.status == 303 and away.headers["Location"] == "/", elsewhere
    assert "/login?<redacted>" in caplog.text and TOKENS["bob"] not in caplog.text  # tokens never reach the log
    assert session.split("=", 1)[1] not in caplog.text


def test_the_run_page_has_one_form_per_candidate_and_the_view_is_audited(
    world: World, server: serve.ReviewServer
) -> None:
    html = page(server, world.run_id, bearer("alice")).body
    assert html.index(NOTICE) < html.index("<h1")
    assert html.count('<form class="decide"') == len(world.rows) == html.count('<article id="c-')
    assert html.count(f'action="/runs/{world.run_id}/review"') == len(world.rows)
    for decision in DECISIONS:
        assert html.count(f'name="status" value="{decision}"') == len(world.rows)
    assert set(DECISIONS) == set(REVIEW_INPUTS)
    for row in world.rows:
        assert f'id="{card_anchor(row["probe_id"], row["rank"])}"' in html
    assert "form-action &#x27;self&#x27;" in html and "Viewed under audit record" in html
    csrf_of(html)
    intent, outcome = audited(world, "results.view")
    assert intent["actor"] == "alice" and intent["case_id"] == "CASE-5" and intent["run_id"] == world.run_id
    assert intent["purpose"] == "fraud-investigation" and intent["watchlist_id"]
    assert outcome["status"] == "ok" and outcome["counts"]["candidates_shown"] == len(world.rows)


# ------------------------------------------------------------------------------------------------- decisions


def test_csrf_is_required(world: World, server: serve.ReviewServer) -> None:
    alice = page(server, world.run_id, bearer("alice")).body
    bob = page(server, world.run_id, bearer("bob")).body
    assert csrf_of(alice) != csrf_of(bob)
    fields = {"probe_id": "p1", "rank": "1", "status": "potential_candidate"}
    for extra in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": csrf_of(bob)}):
        reply = post(server, world.run_id, fields | extra, bearer("alice"))
        assert reply.status == 403 and "CSRF" in reply.body, extra
    twice = post(server, world.run_id, [*fields.items(), ("csrf", csrf_of(alice)), ("csrf", "x")], bearer("alice"))
    assert twice.status == 403
    assert reviews(world) == [] and audited(world, "review") == []


def test_a_decision_is_recorded_and_audited_under_the_token_reviewer(world: World, server: serve.ReviewServer) -> None:
    login = call(server, "GET", "/login?" + urlencode({"token": TOKENS["alice"]}))
    cookie = {"Cookie": login.headers["Set-Cookie"].split(";")[0]}
    token = csrf_of(page(server, world.run_id, cookie).body)
    fields = {"probe_id": "p2", "rank": "2", "status": "inconclusive", "csrf": token, "reviewer": "mallory"}
    reply = post(server, world.run_id, fields, cookie | {"Origin": "null", "Sec-Fetch-Site": "same-origin"})
    assert reply.status == 303, reply.body
    assert reply.headers["Location"] == f"/runs/{world.run_id}#{card_anchor('p2', 2)}"
    [row] = reviews(world)
    assert (
        row["reviewer"] == "alice" and row["status"] == "inconclusive" and (row["probe_id"], row["rank"]) == ("p2", 2)
    )
    intent, outcome = audited(world, "review")
    assert intent["actor"] == "alice" and intent["decision"] == "inconclusive" and intent["case_id"] == "CASE-5"
    assert (intent["run_id"], intent["probe_id"], intent["rank"]) == (world.run_id, "p2", 2)
    assert outcome["status"] == "ok"
    assert "mallory" not in str(AuditLog.of(world.settings).records())
    assert status_on_page(page(server, world.run_id, cookie).body, "p2", 2) == "inconclusive"


def test_two_different_reviewers_confirm_one_never_does(world: World, server: serve.ReviewServer) -> None:
    run = world.run_id
    alice = csrf_of(page(server, run, bearer("alice")).body)
    mark = {"probe_id": "p1", "rank": "1", "status": "potential_candidate"}
    for _ in range(2):
        assert post(server, run, mark | {"csrf": alice}, bearer("alice")).status == 303
    assert status_on_page(page(server, run, bearer("alice")).body, "p1", 1) == "potential_candidate"
    bob = csrf_of(page(server, run, bearer("bob")).body)
    assert post(server, run, mark | {"csrf": bob}, bearer("bob")).status == 303
    html = page(server, run, bearer("bob")).body
    assert status_on_page(html, "p1", 1) == "confirmed_candidate" and "Confirmed candidate" in html
    assert effective_statuses(Gallery(world.settings.storage))[(run, "p1", 1)] == "confirmed_candidate"
    assert sorted(r["reviewer"] for r in reviews(world)) == ["alice", "alice", "bob"]


# -------------------------------------------------------------------------------------------- hostile input


def test_hostile_requests_get_plain_errors(world: World, server: serve.ReviewServer) -> None:
    run = world.run_id
    token = csrf_of(page(server, run, bearer("alice")).body)
    good = {"probe_id": "p1", "rank": "1", "status": "no_candidate", "csrf": token}
    bad_fields = {
        "probe_id": ["<script>alert(1)</script>", "../../etc", "", "p" * 70],
        "rank": ["0", "-1", "1e3", "abc", "", "9999999", " 1"],
        "status": ["confirmed_candidate", "identified", "", "<b>x</b>"],
    }
    for name, values in bad_fields.items():
        for value in values:
            reply = post(server, run, good | {name: value}, bearer("alice"))
            assert reply.status == 400, (name, value, reply.body)
            assert "<script>alert" not in reply.body and "<b>x</b>" not in reply.body
            no_traceback(reply)
    missing = post(server, run, {k: v for k, v in good.items() if k != "rank"}, bearer("alice"))
    assert missing.status == 400 and "rank" in missing.body
    absent = post(server, run, good | {"rank": "50"}, bearer("alice"))
    assert absent.status == 400 and "has no candidate of rank 50" in absent.body  # the refusal's own words
    doubled = post(server, run, [*good.items(), ("status", "potential_candidate")], bearer("alice"))
    assert doubled.status == 400
    wrong_type = call(
        server, "POST", f"/runs/{run}/review", b"{}", {"Content-Type": "application/json"} | bearer("alice")
    )
    assert wrong_type.status == 415
    huge = call(server, "POST", f"/runs/{run}/review", b"a=" + b"x" * 20_000, FORM | bearer("alice"))
    assert huge.status == 413
    latin = call(server, "POST", f"/runs/{run}/review", b"probe_id=p%FF1&rank=1", FORM | bearer("alice"))
    assert latin.status == 400
    raw = call(server, "POST", f"/runs/{run}/review", b"\xff\xfe=1", FORM | bearer("alice"))
    assert raw.status == 400
    for path in ("/nope", "/runs", f"/runs/{run}/x", "/runs/not-a-run", "/runs/%3Cscript%3E", "/runs/a%2Fb"):
        reply = call(server, "GET", path, headers=bearer("alice"))
        assert reply.status == 404 and "<script>" not in reply.body, path
        no_traceback(reply)
    assert post(server, "not-a-run", good, bearer("alice")).status == 404
    assert call(server, "POST", "/", b"a=1", FORM | bearer("alice")).status == 404
    assert call(server, "PUT", f"/runs/{run}/review", b"", bearer("alice")).status == 501
    assert reviews(world) == [] and audited(world, "review") == []


def test_cross_site_posts_are_refused(world: World, server: serve.ReviewServer) -> None:
    run = world.run_id
    token = csrf_of(page(server, run, bearer("alice")).body)
    fields = {"probe_id": "p1", "rank": "1", "status": "no_candidate", "csrf": token}
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://evil.example"},
        {"Referer": "http://evil.example/runs/x"},
    ):
        reply = post(server, run, fields, bearer("alice") | headers)
        assert reply.status == 403, headers
    assert reviews(world) == []
    host = f"127.0.0.1:{server.server_address[1]}"
    same = {"Origin": f"http://{host}", "Referer": f"http://{host}/runs/{run}"}
    assert post(server, run, fields, bearer("alice") | same).status == 303
    assert len(reviews(world)) == 1


def test_an_unexpected_failure_is_a_plain_500(
    world: World, server: serve.ReviewServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("secret internal detail at /srv/home")

    monkeypatch.setattr(serve, "review_candidate", boom)
    token = csrf_of(page(server, world.run_id, bearer("alice")).body)
    reply = post(
        server, world.run_id, {"probe_id": "p1", "rank": "1", "status": "no_candidate", "csrf": token}, bearer("alice")
    )
    assert reply.status == 500 and "secret internal detail" not in reply.body
    no_traceback(reply)


def test_security_headers_and_the_notice_on_every_response(world: World, server: serve.ReviewServer) -> None:
    replies = [
        call(server, "GET", "/", headers=bearer("alice")),
        page(server, world.run_id, bearer("alice")),
        call(server, "GET", "/"),
        call(server, "GET", "/nope"),
        call(server, "GET", "/login?" + urlencode({"token": TOKENS["alice"]})),
        call(server, "DELETE", "/"),
        call(server, "POST", f"/runs/{world.run_id}/review", b"rank=x", FORM | bearer("alice")),
    ]
    assert [r.status for r in replies] == [200, 200, 401, 404, 303, 501, 403]
    for reply in replies:
        for name, value in SECURITY.items():
            assert reply.headers[name] == value, (reply.status, name)
        csp = reply.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
        body = reply.body[reply.body.index("<body>") + len("<body>") :].lstrip()
        assert body.startswith(f'<div class="notice" role="note">{NOTICE}</div>'), (reply.status, body[:120])


# --------------------------------------------------------------------------------------------- header mode


def test_the_proxy_header_is_trusted_from_loopback_only(world: World, proxied: serve.ReviewServer) -> None:
    run = world.run_id
    user = {"X-Remote-User": "Carol"}
    listed = call(proxied, "GET", "/", headers=user)
    assert listed.status == 200 and "Reviewing as <strong>carol</strong>" in listed.body
    assert call(proxied, "GET", "/").status == 403
    assert call(proxied, "GET", "/", headers={"X-Remote-User": "not an id"}).status == 403
    assert call(proxied, "GET", "/", headers=bearer("alice")).status == 403  # tokens mean nothing here
    assert call(proxied, "GET", "/login?token=" + TOKENS["alice"]).status == 404
    token = csrf_of(page(proxied, run, user).body)
    fields = {"probe_id": "p1", "rank": "3", "status": "potential_candidate", "csrf": token}
    assert post(proxied, run, fields, {"X-Remote-User": "dave"}).status == 403  # another person's form
    assert post(proxied, run, fields, user).status == 303
    assert [r["reviewer"] for r in reviews(world)] == ["carol"]

    identity, secret, sessions = proxied.identity, proxied.secret, proxied.sessions
    headers = Message()
    headers["X-Remote-User"] = "carol"
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert serve.identify(identity, secret, sessions, peer, headers).reviewer == "carol"
    for peer in ("10.0.0.7", "192.168.1.2", "::ffff:10.0.0.7", "2001:db8::1"):
        with pytest.raises(serve.Denied) as denied:
            serve.identify(identity, secret, sessions, peer, headers)
        assert denied.value.status == 403 and "reverse proxy on this host" in denied.value.message
    headers["X-Remote-User"] = "eve"  # sent twice
    with pytest.raises(serve.Denied, match="exactly once"):
        serve.identify(identity, secret, sessions, "127.0.0.1", headers)


# -------------------------------------------------------------------------------------------------- browser


def dump_url(url: str) -> str:
    """chromium --dump-dom of a loopback URL, with the flags of tests/browser.py (nothing else is contacted)."""
    assert url.startswith("http://127.0.0.1:"), url
    binary = ensure_chromium()
    with tempfile.TemporaryDirectory(prefix="gm-chromium-") as profile:
        command = [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def test_the_served_page_in_a_real_browser(world: World, server: serve.ReviewServer) -> None:
    ensure_chromium()
    port = int(server.server_address[1])
    query = urlencode({"token": TOKENS["alice"], "next": f"/runs/{world.run_id}"})
    dom = dump_url(f"http://127.0.0.1:{port}/login?{query}")  # login, cookie, redirect, page
    cards = re.findall(r'<article id="c-[^"]*" class="candidate[^"]*"', dom)
    forms = re.findall(r'<form class="decide" method="post" action="/runs/[^"]+/review"', dom)
    assert len(cards) == len(forms) == len(world.rows), dom[:2000]
    assert dom.count('name="status" value="potential_candidate"') == len(world.rows)
    body = dom[dom.index("<body>") :]
    assert body.index(NOTICE) < body.index("<article")
    assert "Reviewing as <strong>alice</strong>" in dom
    assert [r["actor"] for r in audited(world, "results.view")] == ["alice", "alice"]


def test_port_in_use_is_refused(world: World, tokens: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(Refused, match="cannot listen"):
            serve.make_server(
                world.settings, serve.identity_from_options(None, tokens), "127.0.0.1", taken.getsockname()[1]
            )
