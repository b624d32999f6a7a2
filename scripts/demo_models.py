"""Pick the demo's models: each configured model when its weights are here, else its untrained id, and why."""

from __future__ import annotations

from pipelines.models import CLIP_UNTRAINED, FACE_UNTRAINED, model_catalogue
from pipelines.settings import load_settings


def main() -> None:
    settings = load_settings()
    wanted = [settings.face_model, settings.image_model]
    found = {m["model_id"]: m for m in model_catalogue(settings.resolved_models_dir, wanted)}
    where = settings.resolved_models_dir
    face = settings.face_model if found[settings.face_model]["available"] else FACE_UNTRAINED
    image = settings.image_model if found[settings.image_model]["available"] else CLIP_UNTRAINED
    missing = [m for m in wanted if not found[m]["available"]]
    why = (
        f"no local weights for {', '.join(missing)} in {where} or the libraries' caches "
        "(no model hub is reachable here; see README 'Model weights')"
        if missing
        else ""
    )
    print(face, image, why)


if __name__ == "__main__":
    main()
