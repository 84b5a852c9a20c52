"""Identity on the head only (issue 25): the score ignores the background, the embedder trains on
head-masked, augmented views, and its reliability report gives the right numbers on known cases."""

import math

import lightning as L
import pytest
import torch

from icp.data import keys as K
from icp.eval.evaluator import Evaluator, Extractors
from icp.eval.trained import IcpEmbedder
from icp.models.embedder import IdentityEmbedderNet, export
from icp.render import renderer as R

RES = 32


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("emb") / "embedder.pt"
    net = IdentityEmbedderNet(dim=8, width=4, depth=2, input_size=16)
    # calibrate the batch norms on noise: an untrained net's fresh statistics map every image to ~one
    # direction (cosine 1 for all), which could not show a background effect
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(32, 3, 16, 16) * 2 - 1)
    export(net.eval(), path)
    return IcpEmbedder(weights=str(path))


def _render(k: int, view: int, bg_view: int) -> dict:
    """Identity k in view ``view``'s pose and light, with view ``bg_view``'s background."""
    pose, light, _ = R.sample_view(k, view, 0)
    _, _, bg = R.sample_view(k, bg_view, 0)
    out = R.render(R.sample_identity(k, 0)[None], pose[None], light[None], bg[None], RES)
    return {"rgb": out["rgb"] * 2 - 1, "fg": out["fg"]}


def test_identity_score_ignores_the_background(tiny_embedder):
    ids = [3, 4]
    profiles = [_render(k, 0, 0) for k in ids]
    outs_a = [_render(k, 1, 1) for k in ids]
    outs_b = [_render(k, 1, 7) for k in ids]   # the same head, pose and light; another background
    batch = {K.PROFILE: torch.cat([p["rgb"] for p in profiles]), K.PROFILE_FG: torch.cat([p["fg"] for p in profiles]),
             K.TARGET: torch.cat([o["rgb"] for o in outs_a]), K.TARGET_FG: torch.cat([o["fg"] for o in outs_a]),
             K.IDENTITY: torch.tensor(ids)}
    out_a, out_b = torch.cat([o["rgb"] for o in outs_a]), torch.cat([o["rgb"] for o in outs_b])
    assert (out_a - out_b).abs().amax() > 0.1  # the backgrounds do differ
    ev = Evaluator(Extractors(identity={"icp": tiny_embedder}))
    score_a = torch.tensor([r["id_cos_icp"] for r in ev.update(out_a, batch)])
    score_b = torch.tensor([r["id_cos_icp"] for r in ev.update(out_b, batch)])
    # the profile's background swapped too
    other_profiles = torch.cat([_render(k, 0, 9)["rgb"] for k in ids])
    score_c = torch.tensor([r["id_cos_icp"] for r in ev.update(out_a, {**batch, K.PROFILE: other_profiles})])
    assert torch.allclose(score_a, score_b, atol=1e-5) and torch.allclose(score_a, score_c, atol=1e-5)
    # without the head masks (what real photos get) the same swap moves the score: masking is what holds it
    whole = {k: v for k, v in batch.items() if k not in (K.PROFILE_FG, K.TARGET_FG)}
    whole_a = torch.tensor([r["id_cos_icp"] for r in ev.update(out_a, whole)])
    whole_b = torch.tensor([r["id_cos_icp"] for r in ev.update(out_b, whole)])
    assert (whole_a - whole_b).abs().max() > 1e-3


def test_verification_numbers_on_constructed_cases():
    from icp.eval.reliability import roc_auc, tar_at_far, verification_by_yaw

    # hand-made scores: 4 genuine, 100 impostors; FAR 1 % lets exactly one impostor through
    imp = torch.linspace(0, 0.5, 100)
    scores = torch.cat([torch.tensor([0.9, 0.6, 0.49, 0.3]), imp])
    genuine = torch.cat([torch.ones(4, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)])
    tar, thr = tar_at_far(scores, genuine, 0.01)
    assert thr == pytest.approx(float(imp[-2])) and tar == pytest.approx(0.5)  # 0.9, 0.6 > 0.4949...
    assert roc_auc(scores, genuine) == pytest.approx((100 + 100 + 98 + 60) / 400)
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == pytest.approx(0.5)  # ties half
    assert math.isnan(roc_auc(scores[:4], genuine[:4]))

    ids = torch.arange(30).repeat_interleave(6)
    yaw = torch.rand(len(ids), generator=torch.Generator().manual_seed(0)) * 150 - 75
    oracle = torch.nn.functional.one_hot(ids).float()
    rep = verification_by_yaw(oracle, ids, yaw)
    assert list(rep) == ["all", "[0,30)", "[30,60)", "[60,180)"]
    for v in rep.values():
        assert v["auc"] == 1.0 and v["tar"] == 1.0 and v["n_genuine"] > 0 and v["n_impostor"] > 0
    assert sum(rep[b]["n_genuine"] for b in list(rep)[1:]) == rep["all"]["n_genuine"] == 30 * 15
    rand = torch.nn.functional.normalize(torch.randn(len(ids), 64, generator=torch.Generator().manual_seed(1)), dim=1)
    v = verification_by_yaw(rand, ids, yaw)["all"]
    assert abs(v["auc"] - 0.5) < 0.05 and v["tar"] < 0.1


def test_reliability_report_on_renders_and_blur(tiny_embedder):
    from icp.eval.reliability import blur_drop, heldout_views, reliability_markdown, reliability_report

    # flat images: blur changes nothing, so the drop is 0
    flat = torch.rand(6, 3, 1, 1).expand(6, 3, 16, 16).contiguous() * 2 - 1
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    flatten = lambda x: x.flatten(1)  # noqa: E731
    drop = blur_drop(flatten, flat, ids)
    assert drop["1"]["drop"] == pytest.approx(0, abs=1e-5) and drop["2"]["drop"] == pytest.approx(0, abs=1e-5)
    # identity carried by pixel-scale texture only: blur wipes it out, the more the wider
    g = torch.Generator().manual_seed(0)
    texture = torch.randn(3, 3, 16, 16, generator=g).repeat_interleave(2, 0)
    drop_of = blur_drop(flatten, (texture + 0.3 * torch.randn(6, 3, 16, 16, generator=g)).tanh(), ids)
    assert drop_of["0"]["auc"] == 1.0 and drop_of["0"]["mean_genuine"] > 0.8
    assert drop_of["2"]["drop"] > drop_of["1"]["drop"] > 0.2
    views = heldout_views(first=40, count=3, views=3, resolution=24, seed=0)
    assert views["images"].shape == (9, 3, 24, 24) and views["identity"].tolist() == [40] * 3 + [41] * 3 + [42] * 3
    report = reliability_report(tiny_embedder, views)
    assert report["head_only"] and report["identities"] == 3 and report["valid"] == 9
    assert report["verification"]["all"]["n_genuine"] == 9 and report["verification"]["all"]["n_impostor"] == 27
    md = reliability_markdown(report)
    assert "| [0,30) deg |" in md and "| 2 |" in md and "TAR @ FAR 1%" in md


def test_embedder_augment_hides_the_background():
    from icp.tasks.embedder import augment, gaussian_blur

    a, b = _render(5, 0, 0), _render(5, 0, 3)
    x = torch.cat([a["rgb"], b["rgb"]])
    fg = torch.cat([a["fg"], b["fg"]])
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    out1 = augment(x[:1].repeat(8, 1, 1, 1), fg[:1].repeat(8, 1, 1, 1), g(), blur_sigma=0)
    out2 = augment(x[1:].repeat(8, 1, 1, 1), fg[1:].repeat(8, 1, 1, 1), g(), blur_sigma=0)
    assert torch.allclose(out1, out2, atol=1e-6)       # only the head reaches the network
    assert out1.std(0).mean() > 0.01 and out1.abs().max() <= 1  # the jitter differs per sample
    flat = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.0, 2.0])), flat, atol=1e-6)
    noisy = torch.rand(1, 3, 16, 16)
    assert gaussian_blur(noisy, 2.0).std() < gaussian_blur(noisy, 1.0).std() < noisy.std()


def test_embedder_task_trains_on_head_masked_shard_views(tmp_path):
    from icp.data.datamodule import ShardDataModule
    from icp.data.shards.write import synth
    from icp.models.embedder import load_net
    from icp.tasks.embedder import EmbedderTask

    synth(tmp_path / "train", 4, 3, 16, seed=0, shard_size=4, progress=False)
    synth(tmp_path / "val", 2, 3, 16, seed=0, shard_size=2, first_identity=4, progress=False)
    dm = ShardDataModule(str(tmp_path / "train"), str(tmp_path / "val"), batch_size=6, num_workers=0,
                         images_only=True, with_flow=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch[K.PROFILE_FG].shape == (6, 1, 16, 16)  # the mask the embedder needs rides with each view
    task = EmbedderTask(num_identities=4, dim=8, width=4, depth=2, input_size=16)
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path / "run"), accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "val/verif_auc" in trainer.callback_metrics
    blob = torch.load(tmp_path / "run" / "embedder.pt", weights_only=True)
    assert blob["meta"]["input"] == "head only" and load_net(tmp_path / "run" / "embedder.pt")
    from icp.core.errors import DataError
    with pytest.raises(DataError, match="head_only"):
        task.training_step({K.PROFILE: batch[K.PROFILE], K.IDENTITY: batch[K.IDENTITY]}, 0)
