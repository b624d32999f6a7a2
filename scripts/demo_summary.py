"""The demo's last step: a short Polars summary of every result set, read the way a data team would."""

from __future__ import annotations

import polars as pl

from jobs.api import results


def main() -> None:
    frame = results().collect()
    if frame.is_empty():
        print("no candidates in any result set")
        return
    summary = (
        frame.group_by("run_id", "watchlist_id", "case_id", "model_id")
        .agg(
            pl.col("probe_id").n_unique().alias("probes"),
            pl.len().alias("candidates"),
            pl.col("above_threshold").sum().alias("above_threshold"),
            pl.col("score").max().round(4).alias("best_score"),
        )
        .sort("run_id")
    )
    with pl.Config(tbl_cols=-1, tbl_width_chars=160):
        print(summary)
    print("Candidate lists are for human review; they are not identifications.")


if __name__ == "__main__":
    main()
