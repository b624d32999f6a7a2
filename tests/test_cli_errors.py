"""The real `gallerymatch` command, abused: every failure ends in an exit code and a line, never a traceback.

Each test runs the installed console script in a subprocess against a tmp home and a tmp key folder.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings

from jobs.exits import exit_code_of
from pipelines.audit import AuditLog, record_key
from pipelines.errors import Refused
from pipelines.objectstore import StorageFull
from pipelines.settings import Settings

BIN = Path(sys.executable).with_name("gallerymatch")
SUBMIT = ["watchlist", "submit", "nowhere-probes"]
VALID = [
    "--name",
    "batch",
    "--case-id",
    "CASE-1",
    "--purpose",
    "criminal-investigation",
    "--legal-basis",
    "warrant 1",
    "--requested-by",
    "unit-7",
]
HOSTILE = {
    "CASE-1\nforged 999 line": "a newline starts a forged record line",
    "CASE-2\r   999 overwritten": "a carriage return overwrites the line on a terminal",
    "CASE-3\x1b[2K\x1b[1Gerased": "terminal escape sequences",
    "CASE-4\u2028\x85separator": "unicode line and paragraph separators",
}


def env_for(home: Path, keys: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERYMATCH_")}
    return env | {"GALLERYMATCH_HOME": str(home), "GALLERYMATCH_AUDIT_KEY_DIR": str(keys)} | extra


@pytest.fixture
def home(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "home", audit_key_dir=tmp_path / "keys")


def cli(settings: Settings, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    [proc] = cli_all(settings, [list(args)], **extra)
    return proc


def cli_all(settings: Settings, commands: list[list[str]], **extra: str) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at once (each start of the CLI costs seconds of imports)."""
    env = env_for(settings.home, settings.resolved_audit_key_dir, **extra)
    started = [
        (args, subprocess.Popen([str(BIN), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args in commands
    ]
    done = []
    for args, proc in started:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess([str(BIN), *args], proc.returncode, out, err))
    return done


def quiet_failure(proc: subprocess.CompletedProcess[str], code: int) -> list[str]:
    """The exit code is `code`, there is no traceback, and stderr says what went wrong."""
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "an error needs a message"
    return lines


# -- usage errors ------------------------------------------------------------------------------------------------


USAGE_ERRORS = {
    "missing option": (SUBMIT, "Missing option '--name'"),
    "--threshold abc": ([*SUBMIT, *VALID, "--threshold", "abc"], "Invalid value for '--threshold'"),
    "--top-k abc": ([*SUBMIT, *VALID, "--top-k", "abc"], "Invalid value for '--top-k'"),
    "unknown command": (["no-such-command"], "No such command 'no-such-command'"),
    "unknown option": (["results", "list", "--no-such-option"], "No such option: --no-such-option"),
    "match without argument": (["match"], "Missing argument"),
}


def test_usage_errors_exit_2_with_usage_and_no_traceback(home: Settings) -> None:
    procs = cli_all(home, [args for args, _ in USAGE_ERRORS.values()])
    for (case, (_, says)), proc in zip(USAGE_ERRORS.items(), procs, strict=True):
        lines = quiet_failure(proc, 2)
        assert any(line.startswith("Usage:") for line in lines), (case, proc.stderr)
        assert lines[-1].startswith("Error:") and says in lines[-1], (case, proc.stderr)
    assert not home.local_home.exists()  # refused before any work


BAD_CHOICES = [
    ["nightly", "--engine", "spark"],
    ["match", "wl-x", "--engine", "spark"],
    ["match", "wl-x", "--index", "hnsw"],
    ["ingest", "shards", "--engine", "spark"],
]


def test_values_off_a_closed_list_are_refused(home: Settings) -> None:
    for args, proc in zip(BAD_CHOICES, cli_all(home, BAD_CHOICES), strict=True):
        [line] = quiet_failure(proc, 2)
        assert line.startswith(f"error: {args[-2]} must be one of") and repr(args[-1]) in line, line
    assert not home.local_home.exists()  # refused before the home is touched


BAD_DATES = [
    [*SUBMIT, *VALID, "--expires", "20270101"],
    [*SUBMIT, *VALID, "--expires", "2027-W01-1"],
    ["report", "--since", "2027-W01-1"],
    ["report", "--since", "20270101"],
]


def test_dates_other_than_yyyy_mm_dd_are_refused(home: Settings) -> None:
    for args, proc in zip(BAD_DATES, cli_all(home, BAD_DATES), strict=True):
        [line] = quiet_failure(proc, 2)
        assert line.startswith(f"error: {args[-2]} must be") and "YYYY-MM-DD" in line and args[-1] in line, line
    assert not home.local_home.exists()  # the date is checked before the probes path or the home is touched


def test_an_invalid_setting_is_one_line_naming_it(home: Settings) -> None:
    bad = {"GALLERYMATCH_WATCHLIST_DEFAULT_DAYS": "0", "GALLERYMATCH_MATCH_BLOCK_ROWS": "-1"}
    for variable, value in bad.items():
        [proc] = cli_all(home, [["audit", "show"]], **{variable: value})
        [line] = quiet_failure(proc, 2)
        assert line.startswith("error: invalid setting:") and variable in line and repr(value) in line


def test_an_unexpected_error_is_one_line_unless_debug_is_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    boom = RuntimeError("something\nbroke")
    for debug in (None, "0", ""):
        if debug is None:
            monkeypatch.delenv("GALLERYMATCH_DEBUG", raising=False)
        else:
            monkeypatch.setenv("GALLERYMATCH_DEBUG", debug)
        assert exit_code_of(boom) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unexpected RuntimeError: something broke" in err and "Traceback" not in err
    monkeypatch.setenv("GALLERYMATCH_DEBUG", "1")
    try:
        raise boom
    except RuntimeError as raised:
        assert exit_code_of(raised) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_full_disk_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code_of(OSError(errno.ENOSPC, "No space left on device", "/data/x")) == 1
    assert exit_code_of(StorageFull("no space left to write /data/y: free some space and rerun")) == 1
    assert exit_code_of(Refused("two\nlines")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "no space left" in err[0] and "/data/y" in err[1] and err[2] == "error: two lines"


# -- hostile values in the audit trail -----------------------------------------------------------------------------


def _fill_fast(settings: Settings, n: int) -> None:
    """`n` real records, written without fsync (test data; the records are the same)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        log = AuditLog.of(settings)
        for case_id in HOSTILE:
            log.append("analyst\n1", "match", case_id=case_id)
        log.append("analyst-1", "match", phase="outcome", intent_seq="1\nforged", status="ok\nforged 1000 line")
        for i in range(n - len(HOSTILE) - 1):
            log.append("analyst-1", "match", case_id=f"CASE-{i:06d}-" + "x" * 230)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A home with 600 records (over 128 KiB of `audit show`), the first ones holding hostile values."""
    root = tmp_path_factory.mktemp("crowded")
    settings = make_settings(root / "home", audit_key_dir=root / "keys")
    _fill_fast(settings, 600)
    yield settings


def test_audit_show_prints_one_line_per_record(crowded: Settings) -> None:
    proc = cli(crowded, "audit", "show")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert len(proc.stdout.encode()) > 128 * 1024
    lines = proc.stdout.rstrip("\n").split("\n")
    assert len(lines) == 600  # a value can never start a line of its own
    assert not any(ch in proc.stdout for ch in "\r\x1b\x85\u2028")
    assert [line.split()[0] for line in lines] == [str(n) for n in range(1, 601)]
    assert "CASE-1\\nforged 999 line" in lines[0] and "forged" not in "".join(lines[5:])
    hostile = json.loads(cli(crowded, "audit", "show", "--json", "--case-id", "CASE-1\nforged 999 line").stdout)
    assert [r["case_id"] for r in hostile["records"]] == ["CASE-1\nforged 999 line"]  # the data itself is kept


def test_audit_show_of_a_tampered_record_still_prints_one_line(home: Settings) -> None:
    log = AuditLog.of(home)
    log.append("analyst-1", "match", case_id="CASE-1")
    forged = {"seq": "2\n     3 2026-01-01T00:00:00 admin", "hash": "x", "action": "match\nforged", "phase": "intent"}
    home.store.create(record_key(2), json.dumps(forged).encode())
    proc = cli(home, "audit", "show")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stdout.rstrip("\n").split("\n")) == 2, proc.stdout


def _closed_early(settings: Settings, args: list[str], read: int) -> subprocess.Popen[bytes]:
    env = env_for(settings.home, settings.resolved_audit_key_dir)
    proc = subprocess.Popen([str(BIN), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    if read:
        assert len(proc.stdout.read(read)) == read
    proc.stdout.close()  # the reader goes away (`| head -c1`), the writer still has output to give
    proc.wait(timeout=120)
    return proc


def test_a_closed_pipe_after_the_first_byte_ends_quietly(crowded: Settings) -> None:
    proc = _closed_early(crowded, ["audit", "show"], read=1)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert proc.returncode == 0 and err == "", (proc.returncode, err)


def test_a_pipe_closed_before_help_is_printed_ends_quietly(home: Settings) -> None:
    proc = _closed_early(home, ["--help"], read=0)
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    assert proc.returncode == 0 and err == "", (proc.returncode, err)


# -- audit verify / checkpoint -------------------------------------------------------------------------------------


def test_audit_verify_names_cut_records_and_exits_1(home: Settings) -> None:
    log = AuditLog.of(home)
    for i in range(6):
        log.append("analyst-1", "match", case_id=f"CASE-{i}")
    assert log.verify()["ok"]
    for seq in (5, 6):
        home.store.delete(record_key(seq))
    proc, as_json = cli_all(home, [["audit", "verify"], ["audit", "verify", "--json"]])
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.stdout.startswith("audit chain BROKEN: 4 records")
    assert (
        "problem: the witness checkpoint 000000000006.json outside the home vouches for 6 records but the log holds 4"
        in proc.stdout
    )
    assert as_json.returncode == 1 and "Traceback" not in as_json.stderr
    result = json.loads(as_json.stdout)  # exactly one JSON object
    assert result["ok"] is False and result["records"] == 4


def test_audit_checkpoint_then_verify_against_it(home: Settings, tmp_path: Path) -> None:
    log = AuditLog.of(home)
    for i in range(3):
        log.append("analyst-1", "match", case_id=f"CASE-{i}")
    kept = tmp_path / "kept" / "checkpoint.json"
    made = cli(home, "audit", "checkpoint", "--to", str(kept), "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["count"] == 4 and kept.is_file()
    log.append("analyst-1", "match", case_id="CASE-9")
    before = kept.read_bytes()
    proc, again, missing = cli_all(
        home,
        [
            ["audit", "verify", "--against", str(kept)],
            ["audit", "checkpoint", "--to", str(kept)],
            ["audit", "verify", "--against", str(tmp_path / "nowhere.json")],
        ],
    )
    assert proc.returncode == 0 and proc.stdout.startswith("audit chain intact: "), proc.stdout
    [line] = quiet_failure(again, 2)
    assert "never overwritten" in line and kept.read_bytes() == before
    [line] = quiet_failure(missing, 2)
    assert "is not a checkpoint file" in line
