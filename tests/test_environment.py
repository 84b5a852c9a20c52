"""The pinned dependencies work together offline (issue: facenet-pytorch 2.5.3 with our torch)."""

import numpy as np
import torch


def test_facenet_mtcnn_finds_the_face_in_a_real_photo():
    from facenet_pytorch import MTCNN
    from skimage.data import astronaut, coffee

    mtcnn = MTCNN(device="cpu", keep_all=True)
    boxes, probs, landmarks = mtcnn.detect(astronaut(), landmarks=True)
    # numpy 2: facenet-pytorch 2.5.3 returns an object array; cast before using it.
    boxes = np.asarray(boxes.tolist(), dtype=np.float32)
    assert boxes.shape == (1, 4) and float(probs[0]) > 0.99
    x0, y0, x1, y1 = boxes[0]
    assert 150 < x0 < 200 and 30 < y0 < 90 and 230 < x1 < 290 and 120 < y1 < 190  # the astronaut's face
    assert np.asarray(landmarks.tolist()).shape == (1, 5, 2)
    none, _ = mtcnn.detect(coffee())
    assert none is None


def test_torch_version_is_in_the_supported_range():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (2, 4) <= (major, minor) <= (2, 14)
