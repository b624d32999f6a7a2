"""Write the demo's sample gallery: public-domain scikit-image photos plus awkward and hostile files."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.samples import write_sample_gallery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--no-bad-inputs", action="store_true", help="leave out the hostile files")
    args = parser.parse_args()
    made = write_sample_gallery(args.folder, with_bad_inputs=not args.no_bad_inputs)
    print(f"wrote {made['files']} sample files under {args.folder} (public-domain images, made locally)")


if __name__ == "__main__":
    main()
