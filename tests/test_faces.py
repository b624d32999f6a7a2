"""Real MTCNN on public-domain images; InceptionResnetV1 embeddings from the labelled untrained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import samples
from pipelines.faces import CROP_SIZE, FaceDetector, FaceEmbedder, stack_crops

FACE = "facenet-untrained"


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(min_face_size=20, min_prob=0.9, max_side=1280, batch_size=4)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> FaceEmbedder:
    return FaceEmbedder(FACE, tmp_path_factory.mktemp("models"), downloads=False, batch_size=2)


def test_astronaut_has_one_face(detector: FaceDetector) -> None:
    (faces,) = detector.detect([samples.astronaut()])
    assert len(faces) == 1
    face = faces[0]
    assert face.prob > 0.99
    assert np.allclose(face.box, [181, 62, 268, 172], atol=4)
    assert len(face.landmarks) == 10
    assert face.crop.shape == (CROP_SIZE, CROP_SIZE, 3) and face.crop.dtype == np.uint8


def test_no_face_images(detector: FaceDetector) -> None:
    found = detector.detect(list(samples.no_face_images().values()))
    assert found == [[], [], []]


def test_composite_with_several_faces(detector: FaceDetector) -> None:
    (faces,) = detector.detect([samples.composite(3)])
    assert len(faces) == 3
    lefts = sorted(f.box[0] for f in faces)
    assert lefts[0] < 256 <= lefts[1] < 512 <= lefts[2]


def test_mixed_batch_with_and_without_faces(detector: FaceDetector) -> None:
    """facenet-pytorch issue 224: a batch mixing faces and no faces (and sizes) must not fail."""
    coffee = samples.no_face_images()["coffee"].resize((512, 512))
    batch = [samples.astronaut(), coffee, samples.astronaut(300), samples.composite(2), coffee]
    found = detector.detect(batch)
    assert [len(f) for f in found] == [1, 0, 1, 2, 0]


def test_images_smaller_than_a_face_are_skipped_not_crashed_on(detector: FaceDetector) -> None:
    """MTCNN's scale pyramid is empty below the minimum face size: torch.cat() of nothing used to fail."""
    tiny = [Image.new("RGB", size, (128, 90, 60)) for size in ((1, 1), (10, 10), (256, 10))]
    found = detector.detect([tiny[0], samples.astronaut(), tiny[1], tiny[2]])
    assert [len(f) for f in found] == [0, 1, 0, 0]
    assert detector.too_small(tiny[2]) == (
        "image is 256 x 10 px, smaller than the minimum face size (20 px) the detector searches for: "
        "it cannot hold a detectable face"
    )
    assert detector.too_small(samples.astronaut()) is None
    narrow = Image.new("RGB", (4000, 30))  # 30 px tall, but 1280 / 4000 * 30 = 9.6 px once downscaled
    assert "scaled to 1280 x 10 px for detection" in (detector.too_small(narrow) or "")


def test_downscaled_detection_reports_original_coordinates() -> None:
    big = samples.astronaut().resize((2048, 2048), Image.Resampling.BILINEAR)
    det = FaceDetector(min_face_size=20, min_prob=0.9, max_side=512, batch_size=4)
    (faces,) = det.detect([big])
    assert len(faces) == 1
    assert np.allclose(faces[0].box, np.array([181, 62, 268, 172]) * 4, atol=16)


def test_probability_floor_drops_faces() -> None:
    strict = FaceDetector(min_face_size=20, min_prob=1.01, max_side=1280, batch_size=4)
    assert strict.detect([samples.astronaut()]) == [[]]


def test_embeddings_are_unit_512d_and_deterministic(detector: FaceDetector, embedder: FaceEmbedder) -> None:
    faces = detector.detect([samples.astronaut(), samples.composite(3)])
    crops = stack_crops(faces[0] + faces[1])
    vectors = embedder.embed(crops)
    assert vectors.shape == (4, 512) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embedder.embed(crops[:1]), vectors[:1], atol=1e-5)  # batch size does not change a row
    assert embedder.weights_digest.startswith("sha256:")
    other = FaceEmbedder(FACE, Path("/nonexistent"), downloads=False, batch_size=8)
    assert other.weights_digest == embedder.weights_digest  # the untrained id is seeded, so reproducible


def test_detection_matches_facenet_reference_pipeline(detector: FaceDetector) -> None:
    """The detector runs MTCNN channels-last for speed: the faces must be the reference's (facenet-pytorch's
    own MTCNN, plain memory format) up to float rounding, and the crops its extract_face crops."""
    import torch
    from facenet_pytorch import MTCNN, extract_face

    reference = MTCNN(image_size=CROP_SIZE, margin=0, min_face_size=20, keep_all=True)
    assert not reference.pnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = [samples.astronaut(), samples.composite(3), samples.astronaut(300), samples.no_face_images()["coffee"]]
    for image, faces in zip(images, detector.detect(images), strict=True):
        found = reference.detect(image, landmarks=True)
        expected = [] if found[0] is None else [i for i, p in enumerate(found[1]) if p >= 0.9]
        boxes, probs, points = (np.asarray(a, dtype=np.float64) for a in found) if expected else found
        assert len(faces) == len(expected)
        for face in faces:
            i = min(expected, key=lambda k: float(np.abs(boxes[k] - np.array(face.box)).sum()))
            assert np.allclose(face.box, boxes[i], atol=1e-3)
            assert abs(face.prob - probs[i]) < 1e-5
            assert np.allclose(face.landmarks, points[i].reshape(-1), atol=1e-3)
            ref_crop = extract_face(image, boxes[i], CROP_SIZE, 0).permute(1, 2, 0).numpy().astype(np.uint8)
            assert np.abs(face.crop.astype(int) - ref_crop.astype(int)).max() <= 1


def test_embeddings_match_the_plain_memory_format(embedder: FaceEmbedder, detector: FaceDetector) -> None:
    """InceptionResnetV1 also runs channels-last: same vectors as the model in its plain format."""
    import copy

    import torch
    import torch.nn.functional as F
    from facenet_pytorch import fixed_image_standardization

    crops = stack_crops(detector.detect([samples.composite(2)])[0])
    plain = copy.deepcopy(embedder.model).to(memory_format=torch.contiguous_format)
    assert not plain.conv2d_1a.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        x = fixed_image_standardization(torch.from_numpy(crops).permute(0, 3, 1, 2).float())
        expected = F.normalize(plain(x.contiguous()), p=2, dim=1).numpy()
    assert np.allclose(embedder.embed(crops), expected, atol=1e-5)
