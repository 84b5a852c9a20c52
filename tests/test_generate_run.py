"""`icp generate` on the main job's root: says what it loaded, treats renders and photos alike
(both land in the training frame), warns when a photo meets a render-trained model, and writes a
labelled profile | target | output strip (issue 28)."""

import numpy as np
import pytest
from PIL import Image

from icp import cli
from icp.eval.grids import LABEL_H, PAD
from tests.adaptation_run import make_job, render_png


@pytest.fixture(scope="module")
def job(tmp_path_factory, one_thread):
    return make_job(tmp_path_factory.mktemp("job"))


def _generate(job, profile, out, capsys):
    rc = cli.main(["generate", "--profile", str(profile), "--target", str(job["target"]), "--checkpoint",
                   str(job["main"]), "--steps", "2", "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


def test_says_checkpoint_and_domain_and_writes_a_labelled_strip(job, tmp_path, capsys):
    out = tmp_path / "out.png"
    captured = _generate(job, job["profile"], out, capsys)
    ckpt = job["main"] / "stages" / "adaptation" / "cfg-0123456789" / "checkpoints" / "last.ckpt"
    assert f"checkpoint {ckpt}; trained on synthetic renders at 32 px; output 32x32 px" in captured.out
    assert "real photo" not in captured.err  # renders are what it trained on: no warning

    strip = np.asarray(Image.open(tmp_path / "out.strip.png"))
    assert strip.dtype == np.uint8
    tile = 96  # icp.eval.grids enlarges 32-px images 3x (nearest)

    def column(j):
        x0, y0 = PAD + j * (tile + PAD), LABEL_H + PAD
        return strip[y0:y0 + tile, x0:x0 + tile]

    def enlarged(path):
        return np.asarray(Image.open(path).convert("RGB")).repeat(3, 0).repeat(3, 1)

    assert np.array_equal(column(0), enlarged(job["profile"]))  # a render is used as rendered
    assert np.array_equal(column(1), enlarged(job["target"]))
    assert np.array_equal(column(2), enlarged(out))
    for j in range(3):  # a dark label above each column
        x0 = PAD + j * (tile + PAD)
        assert strip[:LABEL_H, x0:x0 + tile].min() < 100


def test_warns_in_one_line_when_a_photo_meets_a_render_model(job, tmp_path, capsys):
    from skimage import data

    photo = tmp_path / "me.png"
    Image.fromarray(data.astronaut()).resize((256, 256)).save(photo)
    captured = _generate(job, photo, tmp_path / "o.png", capsys)
    lines = [line for line in captured.err.splitlines() if "real photo" in line]
    assert len(lines) == 1 and "me.png looks like a real photo" in lines[0]
    assert "trained only on synthetic renders at 32 px" in lines[0]
    assert "target.png" not in lines[0]


@pytest.mark.parametrize("identity,view,resolution", [(0, 0, 32), (3, 1, 32), (5, 2, 64)])
def test_renders_align_into_the_training_frame(job, identity, view, resolution):
    """A render is already in the training frame: alignment keeps it as rendered, at any size, also
    a profile view no face detector finds (identity 0, view 0: yaw 71 degrees)."""
    from icp.inference import prepare_face

    path = render_png(job["faces"] / f"r{identity}-{view}-{resolution}.png", identity, view, resolution)
    aligned = prepare_face(path, 32, align=True)
    assert aligned.shape == (3, 32, 32)
    assert np.array_equal(aligned.numpy(), prepare_face(path, 32, align=False).numpy())


def test_renders_and_photos_are_told_apart(job):
    from skimage import data

    from icp.inference import looks_rendered

    renders = [Image.open(render_png(job["faces"] / f"t{i}.png", i, i % 3, 32 * (1 + i % 3))) for i in range(6)]
    assert all(looks_rendered(r) for r in renders)
    photos = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    assert not any(looks_rendered(p) for p in photos)
    assert not looks_rendered(Image.new("RGB", (32, 32), (90, 120, 200)))  # a backdrop with no one on it


def test_the_render_frame_is_the_renderers():
    """RENDER_TEMPLATE is where the renderer puts the five points of a frontal face."""
    import torch

    from icp.inference import RENDER_TEMPLATE
    from icp.render import renderer as R

    points = []
    for i in range(16):
        _, light, background = R.sample_view(i, 0, 0)
        out = R.render(R.sample_identity(i, 0)[None], torch.zeros(1, 3), light[None], background[None], 64)
        points.append(((out["landmarks"][0, :5] + 0.5) / 64).numpy())
    assert np.abs(np.mean(points, 0) - RENDER_TEMPLATE).max() < 0.01


@pytest.mark.parametrize("identity,pose", [(2, (0.0, 0.0, 0.0)), (7, (10.0, 5.0, 3.0))])
def test_a_render_aligned_as_a_photo_lands_where_it_was(identity, pose):
    """Photos and renders meet in one frame: a near-frontal render put through photo alignment (face
    detection + similarity onto the render frame) comes out close to the render itself; the
    importer's template would shrink the face and move it down (measured: about twice the error)."""
    import torch

    from icp.data.faces import detect_and_align
    from icp.inference import RENDER_TEMPLATE, align_photo, prepare_face
    from icp.render import renderer as R

    _, light, background = R.sample_view(identity, 1, 0)
    out = R.render(R.sample_identity(identity, 0)[None], torch.tensor([pose]), light[None], background[None], 128)
    pil = Image.fromarray((out["rgb"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    as_rendered = prepare_face(pil, 64)
    ours = float((align_photo(pil, 64, "render", RENDER_TEMPLATE) - as_rendered).abs().mean())
    importer = float((detect_and_align(pil, 64).image - as_rendered).abs().mean())
    assert ours < 0.09 and ours < 0.7 * importer, (ours, importer)
    assert torch.equal(prepare_face(pil, 64, template=RENDER_TEMPLATE), as_rendered)  # a render is kept as is
