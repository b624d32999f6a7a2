"""The evaluate benchmark's labelled folder, its child's arguments and its report (no CLI run: that is the
benchmark itself)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import bench_evaluate as bench


def test_the_labelled_folder_has_one_folder_per_identity_of_distinct_photos(tmp_path: Path) -> None:
    ds = bench.build_dataset(tmp_path / "set", identities=3, per_identity=2)
    folders = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert folders == ["person-0000", "person-0001", "person-0002"]
    files = sorted((tmp_path / "set").rglob("*.jpg"))
    assert len(files) == ds.photos == 6 and len({f.read_bytes() for f in files}) == 6
    assert ds.by_base == {"astronaut": 4, "camera": 2}
    again = bench.build_dataset(tmp_path / "again", identities=3, per_identity=2)
    assert [f.read_bytes() for f in sorted((tmp_path / "again").rglob("*.jpg"))] == [f.read_bytes() for f in files]
    assert again.sizes == ds.sizes


def test_child_arguments_after_the_separator_go_to_the_cli() -> None:
    args = bench.parse_args(["--child-timings", "t.json", "--", "evaluate", "d", "--model-id", "m", "--plot", "x.png"])
    assert args.child_timings == Path("t.json")
    assert args.cli_args == ["evaluate", "d", "--model-id", "m", "--plot", "x.png"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--bogus"])


def test_the_report_says_met_or_not_and_warns_the_accuracy_is_meaningless(tmp_path: Path) -> None:
    args = bench.parse_args([])
    ds = bench.Dataset(tmp_path, 150, 1500, {"astronaut": 750, "camera": 750}, 300, (100, 300, 700), 9.0, 30.0)
    result = {
        "weights_digest": "sha256:" + "0" * 64,
        **dict.fromkeys(("identities", "enrolled", "mated_searches", "non_mated_searches", "failed_to_enrol"), 1),
        **dict.fromkeys(("photos", "genuine_pairs", "impostor_pairs"), 1500),
        **{"failed_to_enrol_reasons": {}, "rank1": 0.5, "eer": 0.4},
    }
    command = ["python", "x", "--child-timings", "t", "--", "evaluate", "d", "--model-id", bench.MODEL, "--json"]
    fast = bench.Outcome(command, 300.0, 0, result, {"`jobs.accuracy.evaluate` whole": 280.0}, {}, 5.0, 40)
    text = bench.render(args, ds, fast, [1.0, 2.0], "cmd")
    assert text.startswith(bench.SECTION) and "**Met**" in text and "two real people" in text
    slow = bench.Outcome(command, 700.0, 0, result)
    assert "**NOT met**" in bench.render(args, ds, slow, [1.0, 2.0], "cmd")
