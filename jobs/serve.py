"""`gallerymatch serve`: reviewers look at result sets in a browser and record their decisions, each under the id
the deployment gives them; the page itself never says who is reviewing.

A small standard-library server (`http.server.ThreadingHTTPServer`), on loopback by default. It never starts
without an identity mode, so nobody reviews anonymously:

- `--reviewer-header X-Remote-User`: a reverse proxy on the same host authenticates people and puts their id in
  that header. The header is trusted only from a loopback peer; from anywhere else the request gets 403.
- `--tokens FILE`: lines `TOKEN REVIEWER_ID` (blank and `#` lines ignored; tokens of 16 characters or more; the
  file readable by its owner only). A client sends `Authorization: Bearer TOKEN`, or a browser visits
  `/login?token=TOKEN` once and gets an `HttpOnly; SameSite=Strict` session cookie (a random session id kept in
  this process only; a restart signs everyone out). Tokens are compared in constant time.

Routes: `GET /` lists the result sets; `GET /runs/<run_id>` is the run's review sheet (the same `SheetRun`, the
same renderer as `results sheet`) with a decision form on every candidate card, audited as `results.view` (the
reviewer is shown gallery faces); `POST /runs/<run_id>/review` records one decision through
`jobs.review.review_candidate` (under the writer lease, audited as `review`) and redirects back to the card.
Forms carry a CSRF token tied to the session (HMAC under a per-process key), checked in constant time, and
cross-site posts are refused (`Sec-Fetch-Site`, `Origin`, `Referer`). Every response carries a strict CSP and
no-store / nosniff / no-referrer / DENY headers; every page opens with the notice that it is a candidate list for
human review, not an identification. Errors are one plain message (the refusal's text), never a traceback: those
go to the server's log, and query strings (a /login token) never do.

One request at a time works on the home: the writer lease and the audit trail's view of it are per process.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from jobs.result_sets import list_result_sets
from jobs.review import review_candidate
from jobs.sheet import build_sheet_run
from lance_tables.reviews import CONFIRMED, REVIEW_INPUTS, normalise_reviewer
from pipelines.audit import AuditUnavailable
from pipelines.errors import GalleryMatchError, Refused
from pipelines.results import find_run
from pipelines.settings import Settings
from pipelines.shards import check_id, is_valid_id
from pipelines.sheet import (
    NOTICE,
    SERVED_CSP,
    ReviewForm,
    RunSummary,
    card_anchor,
    esc,
    render_message,
    render_run_list,
    render_sheet,
    score_plot,
)

log = logging.getLogger("gallerymatch.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
MAX_BODY = 16 * 1024  # a decision form is a few hundred bytes
DRAIN_LIMIT = 1024 * 1024  # an oversized body up to this is read and dropped, so the client sees the 413
MIN_TOKEN = 16
MAX_TOKEN_FILE = 1024 * 1024
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000
COOKIE = "gm_session"
FORM_TYPE = "application/x-www-form-urlencoded"
HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
RESERVED_HEADERS = {"authorization", "cookie", "host", "content-type", "content-length", "origin", "referer"}
RUN_PAGE = re.compile(r"/runs/([^/]+)")
RUN_REVIEW = re.compile(r"/runs/([^/]+)/review")
LOGIN_NEXT = re.compile(r"/(runs/[A-Za-z0-9][A-Za-z0-9._-]{0,63})?")
RANK = re.compile(r"[1-9][0-9]{0,5}")
SECURITY_HEADERS = (
    ("Content-Security-Policy", f"{SERVED_CSP}; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)


class Denied(Exception):
    """A request refused with an HTTP status and a plain message (shown to the client, escaped)."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ------------------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class Tokens:
    """Reviewer tokens (TOKEN -> reviewer id), looked up in constant time over every token."""

    entries: tuple[tuple[bytes, str], ...]

    def reviewer_of(self, presented: str) -> str | None:
        given = presented.encode("utf-8", "replace")
        found = None
        for token, reviewer in self.entries:  # every token compared: no early exit tells which one came close
            if hmac.compare_digest(token, given):
                found = reviewer
        return found


@dataclass(frozen=True)
class Identity:
    """Where reviewer ids come from: exactly one of a trusted proxy header, or a token file."""

    header: str | None = None
    tokens: Tokens | None = None

    def describe(self) -> str:
        if self.header is not None:
            return f"the {self.header} header of a reverse proxy on this host"
        return f"bearer tokens / login sessions ({len(self.tokens.entries) if self.tokens else 0} reviewer token(s))"


def identity_from_options(reviewer_header: str | None, tokens: str | Path | None) -> Identity:
    """The identity mode of `serve`; refused without one (no anonymous reviewing) or with both."""
    if reviewer_header is None and tokens is None:
        raise Refused(
            "serve needs an identity mode: --reviewer-header NAME (a reverse proxy on this host authenticates "
            "reviewers) or --tokens FILE (lines 'TOKEN REVIEWER_ID'); nobody reviews anonymously"
        )
    if reviewer_header is not None and tokens is not None:
        raise Refused("give one identity mode: --reviewer-header or --tokens, not both")
    if reviewer_header is not None:
        if not HEADER_NAME.fullmatch(reviewer_header) or reviewer_header.casefold() in RESERVED_HEADERS:
            raise Refused(
                f"--reviewer-header {reviewer_header!r} is not a header name a proxy sets (e.g. X-Remote-User)"
            )
        return Identity(header=reviewer_header)
    return Identity(tokens=load_tokens(Path(str(tokens))))


def load_tokens(path: Path) -> Tokens:
    """Read a token file: `TOKEN REVIEWER_ID` per line; a malformed line is refused with its number (the token
    itself is never echoed), as is a file others may read or write."""
    try:
        info = path.stat()
    except OSError as exc:
        raise Refused(f"--tokens {path}: cannot be read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise Refused(f"--tokens {path}: not a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise Refused(
            f"--tokens {path}: readable or writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"it holds reviewers' credentials: chmod 600 {path}"
        )
    if info.st_size > MAX_TOKEN_FILE:
        raise Refused(f"--tokens {path}: over {MAX_TOKEN_FILE} bytes; it is a list of tokens")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Refused(f"--tokens {path}: cannot be read as UTF-8 text ({exc})") from exc
    entries: list[tuple[bytes, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if words and not words[0].startswith("#"):
            entries.append(_token_line(f"--tokens {path}, line {number}", words, entries))
    if not entries:
        raise Refused(f"--tokens {path}: no tokens (lines 'TOKEN REVIEWER_ID')")
    return Tokens(tuple(entries))


def _token_line(where: str, words: list[str], known: list[tuple[bytes, str]]) -> tuple[bytes, str]:
    if len(words) != 2:
        raise Refused(f"{where}: expected 'TOKEN REVIEWER_ID' (two fields), found {len(words)}")
    token, reviewer = words
    if len(token) < MIN_TOKEN:
        raise Refused(f"{where}: the token is {len(token)} characters; use at least {MIN_TOKEN} random ones")
    if not (token.isascii() and token.isprintable()):
        raise Refused(f"{where}: the token must be printable ASCII")
    try:
        reviewer = normalise_reviewer(check_id("reviewer id", reviewer))
    except Refused as exc:
        raise Refused(f"{where}: {exc}") from exc
    if any(hmac.compare_digest(token.encode(), seen) for seen, _ in known):
        raise Refused(f"{where}: the same token is listed twice")
    return token.encode(), reviewer


def is_loopback(host: str) -> bool:
    """An address (or 'localhost') on this host only; IPv4-mapped IPv6 loopback counts."""
    if host.casefold() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True)
class Principal:
    """Who makes this request (from the deployment) and the CSRF token of their session."""

    reviewer: str
    csrf: str


@dataclass
class Sessions:
    """Login sessions: random id -> (reviewer, expiry), in this process only."""

    ttl_s: float = SESSION_TTL_S
    limit: int = MAX_SESSIONS
    _by_id: dict[str, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, reviewer: str) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._by_id = {k: v for k, v in self._by_id.items() if v[1] > now}
            while len(self._by_id) >= self.limit:
                self._by_id.pop(min(self._by_id, key=lambda k: self._by_id[k][1]))
            self._by_id[sid] = (reviewer, now + self.ttl_s)
        return sid

    def reviewer_of(self, sid: str) -> str | None:
        with self._lock:
            found = self._by_id.get(sid)
            if found is None:
                return None
            if found[1] <= time.monotonic():
                del self._by_id[sid]
                return None
            return found[0]


def identify(
    identity: Identity, secret: bytes, sessions: Sessions, peer: str, headers: Any, cookie_header: str | None = None
) -> Principal:
    """The reviewer of a request, from the deployment only (never from the page); `Denied` (401/403) otherwise.

    `headers` is the request's headers (`email.message.Message`-like: `get`, `get_all`)."""
    if identity.header is not None:
        if not is_loopback(peer):
            raise Denied(403, f"the {identity.header} header is trusted only from a reverse proxy on this host")
        values = headers.get_all(identity.header) or []
        if len(values) != 1:
            raise Denied(403, f"no reviewer identity: the proxy must set {identity.header} exactly once")
        try:
            reviewer = normalise_reviewer(check_id("reviewer id", str(values[0]).strip()))
        except Refused as exc:
            raise Denied(403, str(exc)) from exc
        return Principal(reviewer, _csrf(secret, f"header:{reviewer}"))
    if identity.tokens is None:
        raise Denied(500, "the server has no identity mode")
    challenge = (("WWW-Authenticate", 'Bearer realm="gallerymatch"'),)
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = str(authorization).strip().partition(" ")
        bearer = identity.tokens.reviewer_of(token.strip()) if scheme.casefold() == "bearer" else None
        if bearer is None:
            raise Denied(401, "the bearer token is not valid", challenge)
        return Principal(bearer, _csrf(secret, "bearer:" + hashlib.sha256(token.strip().encode()).hexdigest()))
    sid = _cookie(cookie_header if cookie_header is not None else headers.get("Cookie"))
    session = sessions.reviewer_of(sid) if sid else None
    if sid is None or session is None:
        raise Denied(
            401,
            "sign in first: open /login?token=YOUR_TOKEN once in this browser, or send Authorization: Bearer TOKEN"
            + (" (your session has expired or the server restarted)" if sid else ""),
            challenge,
        )
    return Principal(session, _csrf(secret, f"session:{sid}"))


def _csrf(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


# --------------------------------------------------------------------------------------------------- server


class ReviewServer(ThreadingHTTPServer):
    """The server: settings, identity mode, per-process secret and sessions, one lock for work on the home."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], settings: Settings, identity: Identity) -> None:
        self.settings = settings
        self.identity = identity
        self.secret = secrets.token_bytes(32)
        self.sessions = Sessions()
        self.work = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ReviewHandler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def make_server(
    settings: Settings, identity: Identity, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> ReviewServer:
    """A bound server (port 0: any free port), not yet serving."""
    if not 0 <= port <= 65535:
        raise Refused(f"--port {port}: use 0-65535")
    try:
        return ReviewServer((host, port), settings, identity)
    except OSError as exc:
        raise Refused(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def run_server(
    settings: Settings,
    identity: Identity,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    say: Callable[[str], None] = print,
) -> None:
    """`gallerymatch serve`: serve until interrupted."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not is_loopback(host):
        print(
            f"warning: --host {host} is not loopback: put this server behind a TLS reverse proxy and let nothing "
            "else reach it (it speaks plain HTTP; tokens, cookies and faces would cross the network in the clear)",
            file=sys.stderr,
        )
    server = make_server(settings, identity, host, port)
    say(f"serving result sets for review on {server.url} (reviewers: {identity.describe()}); Ctrl-C stops")
    say(NOTICE)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


_ERROR_PAGE = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>%(code)d %(message)s</title></head>'
    f'<body><div class="notice" role="note">{esc(NOTICE)}</div>'
    "<h1>%(code)d %(message)s</h1><p>%(explain)s</p></body></html>\n"
)


class ReviewHandler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "gallerymatch-serve"
    timeout = 30  # seconds a client may take to send a request
    error_message_format = _ERROR_PAGE
    error_content_type = "text/html; charset=utf-8"

    # -- plumbing -------------------------------------------------------------------------------------------
    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def end_headers(self) -> None:
        for name, value in SECURITY_HEADERS:  # every response, error pages of http.server included
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        text = format % args
        log.info("%s %s", self.address_string(), re.sub(r"\?[^\s\"]*", "?<redacted>", text))

    def _send(self, status: int, body: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self._responded = True
        if self.command != "HEAD":
            self.wfile.write(data)

    def _fail(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._send(status, render_message(f"{status} {HTTPStatus(status).phrase}", message), headers)

    def _handle(self, route: Callable[[], None]) -> None:
        self._responded = False
        try:
            route()
        except Denied as exc:
            self._fail(exc.status, exc.message, exc.headers)
        except AuditUnavailable as exc:
            log.error("audit trail unavailable: %s", exc)
            self._fail(503, "the audit trail cannot take a record, so nothing was shown or recorded; try later")
        except Exception:  # the client gets one plain line; the log gets the traceback
            log.exception("%s %s failed", self.command, urlsplit(self.path).path)
            if not self._responded:
                self._fail(500, "internal error; the server log has the details")

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def _principal(self) -> Principal:
        return identify(
            self.server.identity, self.server.secret, self.server.sessions, self.client_address[0], self.headers
        )

    # -- GET ------------------------------------------------------------------------------------------------
    def _get(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        if path == "/login" and self.server.identity.tokens is not None:
            self._login(parts.query)
        elif path == "/":
            self._list(self._principal())
        elif match := RUN_PAGE.fullmatch(path):
            run_id = unquote(match[1])
            who = self._principal()
            self._run_page(who, run_id)
        else:
            raise Denied(404, "no such page")

    def _login(self, query: str) -> None:
        if self.server.identity.tokens is None:
            raise Denied(404, "no such page")
        try:
            params = parse_qs(query, max_num_fields=4)
        except ValueError as exc:
            raise Denied(400, "malformed query") from exc
        tokens = params.get("token", [])
        if len(tokens) != 1:
            raise Denied(400, "give your token once: /login?token=YOUR_TOKEN")
        reviewer = self.server.identity.tokens.reviewer_of(tokens[0])
        if reviewer is None:
            raise Denied(403, "the token is not valid")
        nexts = params.get("next", ["/"])
        target = nexts[0] if len(nexts) == 1 and LOGIN_NEXT.fullmatch(nexts[0]) else "/"
        sid = self.server.sessions.open(reviewer)
        log.info("login: session opened for reviewer %s", reviewer)
        cookie = f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/"
        proto = (self.headers.get("X-Forwarded-Proto") or "").strip().casefold()
        if proto == "https" and is_loopback(self.client_address[0]):  # behind a TLS proxy on this host
            cookie += "; Secure"
        self._send(
            303,
            render_message("Signed in", f"Signed in as {reviewer}; continue to {target}"),
            (("Location", target), ("Set-Cookie", cookie)),
        )

    def _list(self, who: Principal) -> None:
        with self.server.work:
            runs = list_result_sets(self.server.settings)
        summaries = [
            RunSummary(
                run_id=str(m["run_id"]),
                href="/runs/" + quote(str(m["run_id"]), safe=""),
                case_id=str(m.get("case_id") or ""),
                purpose=str(m.get("purpose") or ""),
                watchlist_id=str(m.get("watchlist_id") or ""),
                candidates=int(m.get("candidates") or 0),
                above_threshold=int(m.get("above_threshold") or 0),
                matched_at=str(m.get("matched_at") or ""),
            )
            for m in runs
        ]
        self._send(200, render_run_list(summaries, who.reviewer))

    def _run_page(self, who: Principal, run_id: str) -> None:
        if not is_valid_id(run_id):
            raise Denied(404, "no result set of that id")
        with self.server.work:
            if find_run(self.server.settings.store, run_id) is None:
                raise Denied(404, f"no result set {run_id}")
            try:
                run = build_sheet_run(self.server.settings, run_id, who.reviewer, False, "results.view")
            except Refused as exc:
                raise Denied(404, str(exc)) from exc
            plot = score_plot(run)
        form = ReviewForm(action=f"/runs/{quote(run_id, safe='')}/review", csrf=who.csrf, reviewer=who.reviewer)
        self._send(200, render_sheet(run, plot, form))

    # -- POST -----------------------------------------------------------------------------------------------
    def _post(self) -> None:
        match = RUN_REVIEW.fullmatch(urlsplit(self.path).path)
        if not match:
            self._drain()
            raise Denied(404, "no such page")
        run_id = unquote(match[1])
        try:
            who = self._principal()
        except Denied:
            self._drain()
            raise
        form = self._form()
        self._same_origin()
        csrf = form.get("csrf", [])
        if len(csrf) != 1 or not hmac.compare_digest(csrf[0].encode("utf-8", "replace"), who.csrf.encode()):
            raise Denied(403, "missing or wrong CSRF token: reload the page and decide again")
        probe_id, rank_text, status = (self._one(form, name) for name in ("probe_id", "rank", "status"))
        if status not in REVIEW_INPUTS:
            raise Denied(
                400,
                f"status must be one of {', '.join(REVIEW_INPUTS)}; {CONFIRMED!r} follows from two different "
                "reviewers marking potential_candidate, and there is no 'identified' status",
            )
        if not RANK.fullmatch(rank_text):
            raise Denied(400, "rank must be a whole number from 1")
        try:
            check_id("probe id", probe_id)
        except Refused as exc:
            raise Denied(400, str(exc)) from exc
        rank = int(rank_text)
        if not is_valid_id(run_id):
            raise Denied(404, "no result set of that id")
        with self.server.work:
            if find_run(self.server.settings.store, run_id) is None:
                raise Denied(404, f"no result set {run_id}")
            try:
                row = review_candidate(self.server.settings, run_id, probe_id, rank, status, who.reviewer)
            except Refused as exc:
                raise Denied(400, str(exc)) from exc
            except AuditUnavailable:
                raise
            except GalleryMatchError as exc:
                log.warning("review not recorded: %s", exc)
                raise Denied(503, f"the decision was not recorded: {exc}") from exc
        log.info("review: %s %s #%d %s by %s -> %s", run_id, probe_id, rank, status, who.reviewer, row["review_status"])
        target = f"/runs/{quote(run_id, safe='')}#{card_anchor(probe_id, rank)}"
        self._send(303, render_message("Recorded", f"Your decision was recorded: {status}"), (("Location", target),))

    def _one(self, form: dict[str, list[str]], name: str) -> str:
        values = form.get(name, [])
        if len(values) != 1:
            raise Denied(400, f"the form field {name} must be given exactly once")
        return values[0]

    def _form(self) -> dict[str, list[str]]:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise Denied(411, "send the form with a Content-Length (no chunked bodies)")
        if self.headers.get_content_type() != FORM_TYPE:
            self._drain()
            raise Denied(415, f"the form must be sent as {FORM_TYPE}")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise Denied(411, "send the form with a Content-Length")
        if not length_text.strip().isdigit():
            self.close_connection = True
            raise Denied(400, "Content-Length is not a number")
        length = int(length_text)
        if length > MAX_BODY:
            self._drain()
            raise Denied(413, f"the form is over {MAX_BODY} bytes")
        body = self.rfile.read(length)
        if len(body) != length:
            raise Denied(400, "the form ended early")
        try:
            return parse_qs(
                body.decode("ascii"),
                keep_blank_values=True,
                strict_parsing=bool(body),
                max_num_fields=16,
                encoding="utf-8",
                errors="strict",
            )
        except ValueError as exc:  # UnicodeDecodeError included
            raise Denied(400, "the form is not valid application/x-www-form-urlencoded UTF-8") from exc

    def _drain(self) -> None:
        """Read (and drop) a body up to DRAIN_LIMIT so the client reads the answer rather than a reset."""
        self.close_connection = True
        text = self.headers.get("Content-Length") or ""
        if self.headers.get("Transfer-Encoding") or not text.strip().isdigit():
            return
        left = int(text)
        if left > DRAIN_LIMIT:
            return
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)

    def _same_origin(self) -> None:
        """Refuse posts a browser says come from another site. `Origin: null` (what browsers send under
        `Referrer-Policy: no-referrer`) and absent headers leave it to the CSRF token."""
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            raise Denied(403, f"a cross-site form post ({site}) is refused")
        hosts = {h for h in (self.headers.get("Host"),) if h}
        forwarded = self.headers.get("X-Forwarded-Host")
        if forwarded and is_loopback(self.client_address[0]):  # a proxy on this host may rewrite Host
            hosts.add(forwarded.split(",")[0].strip())
        for name in ("Origin", "Referer"):
            value = self.headers.get(name)
            if not value or value == "null":
                continue
            if urlsplit(value).netloc.casefold() not in {h.casefold() for h in hosts}:
                raise Denied(403, f"the form was posted from another origin ({name})")
