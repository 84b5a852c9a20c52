"""The base's sample check: MTCNN's face rate on uint8 samples (a real face counts, a no-face photo does not)."""

import numpy as np
from PIL import Image


def test_face_rate_counts_real_faces_only():
    from skimage import data

    from icp.eval.base_samples import face_rate

    face = np.asarray(Image.fromarray(data.astronaut()[0:256, 100:356]).resize((64, 64)))
    coffee = np.asarray(Image.fromarray(data.coffee()).resize((64, 64)))
    assert face_rate(np.stack([face, face]))["face_rate"] == 1.0
    assert face_rate(np.stack([coffee]))["face_rate"] == 0.0
