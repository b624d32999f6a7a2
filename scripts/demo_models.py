"""Pick the demo's models: the configured pretrained ones when their weights are here, else the untrained ids."""

from __future__ import annotations

from pipelines.models import CLIP_UNTRAINED, FACE_UNTRAINED, model_catalogue
from pipelines.settings import load_settings


def main() -> None:
    settings = load_settings()
    wanted = [settings.face_model, settings.image_model]
    found = {m["model_id"]: m for m in model_catalogue(settings.resolved_models_dir, wanted)}
    missing = [m for m in wanted if not found[m]["available"]]
    if not missing:
        print(settings.face_model, settings.image_model)
        return
    where = settings.resolved_models_dir
    print(
        FACE_UNTRAINED,
        CLIP_UNTRAINED,
        f"no local weights for {', '.join(missing)} in {where} or the libraries' caches "
        "(no model hub is reachable here; see README 'Model weights')",
    )


if __name__ == "__main__":
    main()
