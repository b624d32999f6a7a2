"""The nightly benchmark end to end at a tiny size (seconds): its section, its JSON, and that it replaces only
its own section of the docs file; and the target's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import child_env

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import bench_nightly as bench

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_nightly.py"
OTHER = "## Match (scripts/bench_match.py)\n\nSomeone else's table.\n\n| a | b |\n| --- | ---: |\n| 1 | 2 |\n"


def tables(text: str) -> list[list[str]]:
    """The markdown tables of `text`, each as its lines."""
    found: list[list[str]] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found + ([current] if current else [])


def test_the_benchmark_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\nIntro.\n\n{OTHER}\n{bench.SECTION}\n\nstale\n\n## Last\n\nkept\n")
    out = tmp_path / "nightly.json"
    argv = [
        "--gallery=1500",
        "--append-frac=0.04",
        "--watchlists=2",
        "--probes=6",
        "--top-k=4",
        "--chunk=500",
        f"--workdir={tmp_path}",
        f"--json={out}",
        f"--out={docs}",
    ]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        cwd=SCRIPT.parents[1],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    data = json.loads(out.read_text())
    assert (data["gallery"], data["appended"], data["watchlists"], data["probes"]) == (1500, 60, 2, 6)
    steps = data["steps"]
    assert set(steps) == {"first", "delta", "nothing_new", "full"}
    assert steps["first"]["modes"] == {"full (first_run)": 2} and steps["first"]["result_sets"] == 2
    assert steps["delta"]["modes"] == {"delta": 2} and steps["delta"]["result_sets"] == 2
    assert steps["nothing_new"]["runs"] == 0 and steps["nothing_new"]["skipped"] == 2
    assert steps["nothing_new"]["result_sets"] == 0  # a night with nothing new writes nothing
    assert steps["full"]["runs"] == 2 and len(steps["full"]["per_watchlist"]) == 2
    assert [s["rows"] for s in steps["delta"]["scans"]] == [60]  # the delta, read once
    assert [s["rows"] for s in steps["nothing_new"]["scans"]] == [0]
    assert steps["first"]["scans"] == []
    derived = data["derived"]
    assert derived["scans_per_model"]["delta"] == {bench.MODEL: 1}
    assert derived["check_ok"] is True and data["check"]["compared"] == 2 and data["check"]["equal"] == 2
    assert derived["reduced"] is True and isinstance(derived["met"], bool)
    for step in steps.values():
        assert step["seconds"] > 0 and step["peak_rss"] > 0
    assert derived["ratio"] == steps["delta"]["seconds"] / steps["full"]["seconds"]

    text = docs.read_text()
    assert text.startswith(f"# Benchmarks\n\nIntro.\n\n{OTHER}\n{bench.SECTION}\n\n")
    assert text.endswith("## Last\n\nkept\n") and "stale" not in text
    section = text[text.index(bench.SECTION) : text.index("## Last")]
    assert "**Reduced run**" in section and "--gallery=1500" in section and "Check: **exact**" in section
    assert "Target (night 2 at most 5% of the full re-match plus the fixed cost of a night): **" in section
    found = tables(section)
    assert len(found) == 4  # steps, target, scans, phases
    for table in found:
        width = table[0].count("|")
        assert len(table) >= 3 and all(line.count("|") == width for line in table), table
    assert section in done.stdout


def step(seconds: float) -> bench.Step:
    return bench.Step("s", seconds, 0, 0)


def test_the_target_is_five_percent_of_the_full_rematch_plus_the_fixed_cost() -> None:
    res = bench.Results(1000, 10, 2, 4, 3, "local", 500)
    res.steps = {"first": step(50.0), "full": step(100.0), "nothing_new": step(2.0), "delta": step(7.0)}
    assert res.budget == 7.0 and res.met and res.ratio == 0.07
    assert abs(res.variable_share - 0.05) < 1e-12
    res.steps["delta"] = step(7.01)
    assert not res.met


def test_parse_args_derives_the_appended_rows() -> None:
    args = bench.parse_args(["--gallery", "200_000", "--append-frac", "0.01"])
    assert (args.gallery, args.appended, args.watchlists, args.probes) == (200_000, 2_000, 50, 100)
    assert bench.parse_args([]).gallery == bench.DEFAULT_GALLERY
