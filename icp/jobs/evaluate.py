"""The main job's evaluate step: the paired evaluation of held-out identities, flows, relighting.

Everything is measured on identities never seen in training (a disjoint index range of the
generator), through the one paired evaluation (icp.eval.paired): the method beside the
other-identity profile (same model, masked targets and noise; the profile is always another
identity's), the copied and mirrored profile, model-free inpainting of the masked target and the
true render (the ceiling). Intervals are bootstrapped over identities.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from icp.data import keys as K
from icp.eval import baselines as B
from icp.eval import metrics as M
from icp.eval import relighting as RL
from icp.eval.evaluator import build_extractors
from icp.eval.grids import save_grid
from icp.eval.heldout import heldout_loader, interleaved, take
from icp.eval.paired import evaluate_pairs
from icp.eval.record import build_record, sha256_of
from icp.eval.summary import FLOW_MEANINGS
from icp.jobs.runner import Job, shards_dirs

DEFAULT_BASELINES = ("other_identity", "copy_profile", "mirror_profile", "inpaint", "truth")
KID_SUBSET_SIZE = 100


def protocol_of(cfg: DictConfig) -> dict:
    """The main job's evaluation settings in the fields of an ``icp eval`` protocol (its record's
    protocol block and id; eval/protocol.yaml)."""
    ev = cfg.evaluate
    return {"name": "icp-main-job",
            "pairs": {"pairs_per_identity": int(ev.pairs_per_identity), "num_samples": int(ev.pairs),
                      "mask_ratio": float(ev.mask_ratio), "patch_size": int(ev.patch_size), "seed": int(cfg.seed)},
            "generation": {"num_steps": int(ev.steps), "guidance_scale": None, "seed": int(cfg.seed)},
            "metrics": {"kid_subset_size": KID_SUBSET_SIZE}}


def evaluate(cfg: DictConfig, run_dir: Path, jobs: dict[str, Job], device: str = "cpu") -> dict:
    """The main job's metrics.json record (icp.eval.record.build_record: the schema of `icp eval`)."""
    from icp.core.rundir import config_hash
    from icp.tasks.loading import load_task, locate_run

    ev = cfg.evaluate
    out_dir = run_dir / "evaluate"
    out_dir.mkdir(parents=True, exist_ok=True)
    _, ckpt = locate_run(jobs["adaptation"].run_dir)
    ckpt_sha = sha256_of(ckpt)  # before loading: the record names the bytes that were measured
    task = load_task(ckpt, device=device)
    probe = str(jobs["probe"].run_dir / "probe.pt") if "probe" in jobs else None
    extractors = build_extractors(identity=tuple(ev.identity), embedder=str(jobs["embedder"].run_dir / "embedder.pt"),
                                  fid=bool(ev.fid), device=device, probe=probe,
                                  dlib_landmarks=bool(ev.get("dlib_landmarks", "dlib" in ev.identity)))
    baselines = B.resolve(list(OmegaConf.select(cfg, "evaluate.baselines", default=None) or DEFAULT_BASELINES))
    loader = heldout_loader(str(shards_dirs(cfg)[1]), resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio,
                            patch_size=ev.patch_size, pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed,
                            batch_size=ev.batch_size)
    bar = tqdm(total=-(-int(ev.pairs) // int(ev.batch_size)), desc="evaluate", unit="batch")
    result = evaluate_pairs(task.sample, interleaved(loader, int(ev.pairs), int(ev.batch_size)), extractors, device, baselines=baselines,
                            num_steps=int(ev.steps), seed=int(cfg.seed), grid_samples=6, progress=bar,
                            kid_subset_size=KID_SUBSET_SIZE)
    bar.close()
    save_grid(out_dir / "grid.png", result.grid_columns, row_labels=[f"id {i}" for i in result.grid_identities])
    save_examples(result.grid_columns, out_dir / "examples")
    flows = flow_scores(task, cfg, out_dir, device)
    relight = relighting(task, cfg, out_dir, device)
    trust = reliability(extractors, cfg)
    if extractors.probe is not None:
        trust["markdown"] = (trust.get("markdown", "") + "\n"
                             + probe_floor(extractors.probe, cfg, str(shards_dirs(cfg)[1])) + "\n")
    return build_record(result, extractors, source="icp run", run=run_dir, checkpoint=ckpt, checkpoint_sha256=ckpt_sha,
                        task=type(task).__name__, protocol=protocol_of(cfg), shards=shards_dirs(cfg)[1],
                        resolution=int(cfg.data.resolution), config_hash=config_hash(cfg), flows=flows,
                        extra={"summary": summary(result, flows, relight), "relighting": relight, "flows": flows,
                               "notes": notes(relight), "reliability": trust})


def save_examples(columns, out: Path) -> None:
    """The first held-out pair's profile and unmasked target as PNGs, inputs to try ``icp generate``
    and ``icp export`` on (README: after the quickstart)."""
    from PIL import Image

    from icp.eval.grids import to_uint8

    found = dict(columns)
    for name, label in (("profile", "profile"), ("target", "true render")):
        if label in found:
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(found[label][:1])[0]).save(out / f"{name}.png")


def probe_floor(probe, cfg: DictConfig, heldout: str) -> str:
    """The geometry probe's own error on held-out TRUE targets: what its view-consistency figures resolve."""
    from icp.eval.geometry import probe_reliability, reliability_line

    ev = cfg.evaluate
    loader = heldout_loader(heldout, resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio, patch_size=ev.patch_size,
                            pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed, batch_size=ev.batch_size)
    with torch.no_grad():
        return reliability_line(probe_reliability(probe, take(loader, int(ev.pairs)), role="target"))


def reliability(extractors, cfg: DictConfig) -> dict:
    """How far the synthetic-identity metric can be trusted: verification of held-out identities by yaw
    difference and its drop under blur (icp.eval.reliability), on the held-out identities' renders."""
    from icp.eval.reliability import heldout_views, reliability_markdown, reliability_report

    if "icp" not in extractors.identity:
        return {}
    d = cfg.data
    views = heldout_views(int(d.identities), int(d.heldout_identities), int(d.views), int(d.resolution), int(d.seed))
    found = reliability_report(extractors.identity["icp"], views)
    found["markdown"] = reliability_markdown(found)
    return found


def flow_scores(task, cfg: DictConfig, out_dir: Path, device: str) -> dict:
    """Matching-flow error against the renderer's flow, beside the zero flow (adaptation only)."""
    if not hasattr(task, "predict_flow"):
        return {}
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torchvision.utils import save_image

    from icp.tasks.flows import flow_metrics, flow_picture

    ev = cfg.evaluate
    loader = heldout_loader(str(shards_dirs(cfg)[1]), resolution=cfg.data.resolution, mask_ratio=ev.mask_ratio,
                            patch_size=ev.patch_size, pairs_per_identity=ev.pairs_per_identity, seed=cfg.seed,
                            batch_size=ev.batch_size)
    avg = M.Averages(list(FLOW_MEANINGS))
    for i, batch in enumerate(take(loader, int(ev.pairs))):
        batch = move_data_to_device(batch, device)
        if K.FLOW_GT not in batch:
            return {}
        with torch.no_grad():
            flows = task.predict_flow(batch)
        found = flow_metrics(flows, task.match_levels, batch, task.pck_alpha)
        avg.update({k: found[k].reshape(1) for k in FLOW_MEANINGS})
        if i == 0:
            picture = flow_picture(flows, task.match_levels, batch, count=6)[None]
            scale = max(1, 96 // batch[K.TARGET].shape[-1])
            save_image(torch.nn.functional.interpolate(picture, scale_factor=scale, mode="nearest"), out_dir / "flows.png")
    return {k: float(v) for k, v in avg.compute().items()}


def relighting(task, cfg: DictConfig, out_dir: Path, device: str) -> dict:
    """The first held-out identities in one pose under several lights (icp.eval.relighting)."""
    ev, d = cfg.evaluate, cfg.data
    s = RL.relight_set(int(d.identities), min(int(ev.get("relight_identities", 4)), int(d.heldout_identities)),
                       int(ev.relight_lights), int(d.resolution), int(d.seed), int(cfg.seed), float(ev.mask_ratio),
                       int(ev.patch_size))
    out = RL.generate(task.sample, s, int(ev.steps), device, int(cfg.seed))
    cols, labels = RL.grid_columns(out, s, n_show=1)
    save_grid(out_dir / "relight.png", cols, row_labels=labels)
    found = {}
    for name, images in (("method", out), ("inpaint", RL.inpainted(s))):
        rows = RL.scores(images, s)
        found[name] = {k: sum(r[k] for r in rows) / len(rows) for k in RL.KEYS}
    return found


def summary(result, flows: dict, relight: dict) -> str:
    """The report's summary: the identity verdict, then whether the Matching Net learned anything."""
    from icp.eval.summary import identity_verdict

    text = identity_verdict(result)
    if "flow_epe" in flows and "flow_epe_zero" in flows:
        learned = flows["flow_epe"] < flows["flow_epe_zero"]
        text += (f" Matching: flow EPE {flows['flow_epe']:.2f} px vs {flows['flow_epe_zero']:.2f} px for the "
                 f"zero flow, so the Matching Net {'has' if learned else 'has NOT yet'} learned useful "
                 "correspondence at this scale.")
    return text


def notes(relight: dict) -> list[str]:
    m, i = relight["method"], relight["inpaint"]
    return [f"relighting: the output follows its own target's light by {m['follow_shading']:+.4f} (shading) and "
            f"{m['follow_colour']:+.4f} (colour); model-free inpainting of the masked target scores "
            f"{i['follow_shading']:+.4f} / {i['follow_colour']:+.4f} (positive = closer to its own light than "
            "to the other lights)",
            "baselines: the same model, masked targets and noise with each profile swapped for another held-out "
            "identity's (never the same identity); the profile copied and mirrored; model-free inpainting of the "
            "masked target; the true render (the ceiling)",
            "intervals: 95 % bootstrap over identities (pairs of one identity are resampled together); a "
            "comparison with fewer than 20 valid pairs is never called better or worse"]
