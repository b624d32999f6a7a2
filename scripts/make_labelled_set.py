"""Write the demo's labelled set for `gallerymatch evaluate`: public-domain faces in variants, made locally."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.samples import write_labelled_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    made = write_labelled_set(args.folder)
    print(f"wrote {made['files']} photos of {made['identities']} identities under {args.folder} (public domain)")


if __name__ == "__main__":
    main()
