"""View-Consistent Adaptation (paper §3.3-3.4): match, warp identity into the target pose, inject.

Two control UNets read the same stitched canvas as the stitching stage (sample [profile | noisy
target], condition [profile | masked target]):

- the **Appearance Net** (trained by the stitching stage; ``appearance_from`` loads it) gives,
  per level, identity features of the profile half and lighting features of the target half;
- the **Matching Net** (a fresh copy of the base UNet encoder, trained briefly -- the paper's
  100-200 steps) gives features whose cost volume between the target and profile halves yields a
  dense flow target -> profile (icp.models.matching).

:class:`icp.models.fusion.ReferenceFusion` warps the identity features by that flow, adds the
lighting residual, concatenates the identity and injects the result through zero-initialised
projections. The training signal is the denoising loss; an auxiliary loss on the ground-truth
flow (synthetic data) is a switch, off by default. Validation logs flow EPE / PCK against
FLOW_GT and writes colour-wheel flow images under ``<run>/samples`` (icp.tasks.flows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from icp import diffusion as D
from icp.data import keys as K
from icp.core.errors import ConfigError, DataError, WeightsError
from icp.models import matching as M
from icp.models.backbone import Backbone
from icp.models.control import ControlUNet, split_halves, stitch
from icp.models.fusion import ReferenceFusion
from icp.tasks.base import DiffusionTask, Residuals
from icp.tasks.flows import flow_metrics, write_flow_images

# Inference-only batch key: extra profile photos of the same person, a list of (B, 3, H, W).
# Their injections are averaged with the main profile's (icp generate --profile A --profile B).
EXTRA_PROFILES = "extra_profiles"
MATCHING_MODES = ("argmax", "soft")
MATCHING_INITS = ("base", "random")
# Where the warp's flow comes from: the Matching Net (the method), or the renderer's true flow (an
# oracle for synthetic pairs only: what the warp is worth when the matching is right).
FLOW_SOURCES = ("matched", "ground_truth")


def level_flow(flow_gt: Tensor, valid: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """The true pixel flow averaged down to a feature level (in its pixels), with the cells that see
    the profile: the target of the aux flow loss and the oracle's warp."""
    return M.downsample_flow(flow_gt.float(), size, None if valid is None else valid.float())


class AdaptationTask(DiffusionTask):
    """Stage 2 of IC-Portrait. Flat kwargs beyond :class:`DiffusionTask`'s:

    appearance_from: stitching run dir, .ckpt or exported ControlNet folder (None: copy the UNet);
    train_appearance: keep training the Appearance Net here (the paper trains it in stage 1);
    matching_mode: "argmax" (hard flow, straight-through soft gradient) or "soft" (soft-argmax);
    temperature: soft-argmax temperature on cosine costs; chunk_rows: cost-volume chunking;
    match_levels: level indices that get their own cost volume (None: all); the others reuse the
    flow of the matched level nearest in resolution; warp_identity: False = unwarped ablation;
    aux_flow_weight: weight of the ground-truth flow loss (0 = off, the paper's setting);
    flow_eval_timestep: timestep at which validation measures the flow; pck_alpha: PCK threshold
    as a fraction of the image size; flow_images: how many pairs the flow picture shows;
    matching_init: "base" (the Matching Net is a copy of the base UNet's encoder, the paper's
    setting) or "random" (diffusers' default init: the fast-learner ablation, claim a);
    flow_source: "matched" (the Matching Net's flow, the method) or "ground_truth" (the batch's
    flow, averaged down to each level: an oracle for the warping ablation on synthetic pairs).
    """

    def __init__(self, backbone: Backbone, appearance_from: str | None = None, train_appearance: bool = False,
                 matching_mode: str = "argmax", temperature: float = 0.1, chunk_rows: int | None = None,
                 match_levels: Sequence[int] | None = None, warp_identity: bool = True,
                 aux_flow_weight: float = 0.0, flow_eval_timestep: int = 200, pck_alpha: float = 0.05,
                 flow_images: int = 4, cond_embedding_channels: int = 64, matching_init: str = "base",
                 flow_source: str = "matched", **kwargs: Any):
        super().__init__(backbone=backbone, **kwargs)
        if flow_source not in FLOW_SOURCES:
            raise ConfigError(f"model.flow_source='{flow_source}' is not one of {', '.join(FLOW_SOURCES)}")
        if flow_source == "ground_truth" and (not warp_identity or aux_flow_weight > 0):
            raise ConfigError("model.flow_source=ground_truth warps with the true flow: it needs warp_identity=true "
                              "and aux_flow_weight=0 (the Matching Net is not used)")
        self.flow_source = flow_source
        if matching_init not in MATCHING_INITS:
            raise ConfigError(f"model.matching_init='{matching_init}' is not one of {', '.join(MATCHING_INITS)}")
        if matching_mode not in MATCHING_MODES:
            raise ConfigError(f"model.matching_mode='{matching_mode}' is not one of {', '.join(MATCHING_MODES)}")
        if temperature <= 0:
            raise ConfigError(f"model.temperature={temperature} must be > 0 (e.g. 0.05)")
        if aux_flow_weight < 0:
            raise ConfigError(f"model.aux_flow_weight={aux_flow_weight} must be >= 0 (0 disables it)")
        self.appearance = ControlUNet(backbone.unet, cond_embedding_channels=cond_embedding_channels)
        # Built before load_appearance, so "base" copies the backbone as loaded (the pretrained
        # base), not the generation-UNet weights a stitching run trained.
        self.matching = ControlUNet(backbone.unet, cond_embedding_channels=cond_embedding_channels,
                                    copy_weights=matching_init == "base")
        levels = self.appearance.num_levels
        self.match_levels = sorted(set(range(levels) if match_levels is None else (int(l) for l in match_levels)))
        if not self.match_levels or not all(0 <= l < levels for l in self.match_levels):
            raise ConfigError(f"model.match_levels={list(match_levels or [])} must name levels in 0..{levels - 1}")
        self.fusion = ReferenceFusion(self.appearance.channels, self.appearance.channels, warp_identity=warp_identity)
        self.matching_mode, self.temperature, self.chunk_rows = matching_mode, temperature, chunk_rows
        self.matcher = M.FlowMatcher()  # no parameters: checkpoints are unchanged
        self.aux_flow_weight, self.flow_eval_timestep = aux_flow_weight, flow_eval_timestep
        self.pck_alpha, self.flow_images = pck_alpha, flow_images
        if appearance_from:
            load_appearance(self, appearance_from)
        self.appearance.requires_grad_(train_appearance)
        # The control nets' own zero projections are unused here: the fusion projects F_ref.
        for net in (self.appearance, self.matching):
            net.proj_down.requires_grad_(False)
            net.proj_mid.requires_grad_(False)
        self._last_flows: dict[int, Tensor] | None = None
        self._last_soft: dict[int, Tensor] = {}

    # --------------------------------------------------------------------------- conditioning

    def prepare_condition(self, batch: dict) -> dict[str, Any]:
        masked = self.encode_images(batch[K.TARGET_MASKED])
        profiles = [batch[K.PROFILE], *batch.get(EXTRA_PROFILES, [])]
        state = {"profiles": [self.encode_images(p) for p in profiles], "masked": masked}
        if self.flow_source == "ground_truth":
            if K.FLOW_GT not in batch or len(profiles) > 1:
                raise DataError("model.flow_source=ground_truth needs the true flow of one profile per target "
                                f"(batch key '{K.FLOW_GT}', synthetic pairs only); use flow_source=matched")
            state["flow_gt"], state["flow_valid"] = batch[K.FLOW_GT], batch.get(K.FLOW_VALID)
        return state

    def true_flows(self, state: dict, target_feats: list[Tensor]) -> list[Tensor]:
        """The ground-truth flow averaged down to each level (in that level's pixels; 0 where no
        target pixel of the cell sees the profile)."""
        return [level_flow(state["flow_gt"], state["flow_valid"], tuple(f.shape[-2:]))[0] for f in target_feats]

    def _canvas_features(self, net: ControlUNet, profile: Tensor, masked: Tensor, noisy: Tensor,
                         timesteps: Tensor, text: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        canvas = stitch(profile.to(noisy.dtype), noisy)
        cond = stitch(profile.to(noisy.dtype), masked.to(noisy.dtype))
        return split_halves(net(canvas, timesteps, text, cond))

    def match_flows(self, profile_feats: list[Tensor], target_feats: list[Tensor],
                    hard: bool | None = None) -> list[Tensor]:
        """Per-level flows target -> profile (each at its level's resolution, in its pixels).

        Argmax mode is hard in the forward pass; while gradients are on it carries the soft-argmax
        gradient (straight-through), so the denoising loss can still train the Matching Net. The
        soft flows of the matched levels are kept in ``self._last_soft`` for the auxiliary loss
        (a loss on the hard value would see a piecewise-constant function).
        """
        hard = (self.matching_mode == "argmax") if hard is None else hard
        flows, self._last_soft = self.matcher(list(target_feats), list(profile_feats), self.match_levels, hard,
                                              self.temperature, self.chunk_rows)
        return [flows[l] if l in flows else self._borrow(flows, target_feats[l].shape[-2:])
                for l in range(len(target_feats))]

    @staticmethod
    def _borrow(flows: dict[int, Tensor], size: torch.Size) -> Tensor:
        """Flow of the matched level nearest in resolution (finer preferred), resized to ``size``."""
        def key(l: int) -> tuple[float, int]:
            h = flows[l].shape[-2]
            return abs(torch.log2(torch.tensor(h / size[0])).item()), -h
        src = flows[min(flows, key=key)]
        if tuple(src.shape[-2:]) == tuple(size):
            return src
        if src.shape[-2] < size[0]:
            return M.upsample_flow(src, tuple(size))
        return M.downsample_flow(src, tuple(size))[0]

    def condition(self, state: dict, noisy_latents: Tensor, timesteps: Tensor, text_states: Tensor) -> Residuals:
        total: list[Tensor] | None = None
        for i, profile in enumerate(state["profiles"]):
            ident, light = self._canvas_features(self.appearance, profile, state["masked"], noisy_latents,
                                                 timesteps, text_states)
            flows = None
            if self.flow_source == "ground_truth":
                flows = [f.to(noisy_latents.dtype) for f in self.true_flows(state, light)]
            elif self.fusion.warp_identity or (i == 0 and self.aux_flow_weight > 0):
                prof_m, targ_m = self._canvas_features(self.matching, profile, state["masked"], noisy_latents,
                                                       timesteps, text_states)
                flows = self.match_flows(prof_m, targ_m)
            if i == 0 and flows is not None:
                self._last_flows = self._last_soft  # soft flows of the main profile, for the aux loss
            res = self.fusion(ident, light, flows)
            total = res if total is None else [a + b for a, b in zip(total, res)]
        n = len(state["profiles"])
        total = [r / n for r in total]
        return tuple(total[:-1]), total[-1]

    # ------------------------------------------------------------------------------- training

    def losses(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self._last_flows = None
        out = super().losses(batch, generator)
        if self.aux_flow_weight > 0 and self._last_flows and K.FLOW_GT in batch:
            out["flow_aux"] = self.flow_loss(self._last_flows, batch[K.FLOW_GT], batch.get(K.FLOW_VALID))
            out["loss"] = out["loss"] + self.aux_flow_weight * out["flow_aux"]
        self._last_flows = None
        return out

    def flow_loss(self, flows: dict[int, Tensor], flow_gt: Tensor, valid: Tensor | None) -> Tensor:
        """Mean end-point error (in each level's pixels) of the matched levels' soft flows vs the truth."""
        terms = []
        for l in sorted(flows):
            gt, ok = level_flow(flow_gt, valid, tuple(flows[l].shape[-2:]))
            err = (flows[l] - gt).norm(dim=1, keepdim=True)
            terms.append(err.mean() if ok is None else (err * ok).sum() / ok.sum().clamp_min(1.0))
        return torch.stack(terms).mean()

    # ----------------------------------------------------------------------------- validation

    def _matching_flows(self, batch: dict, timesteps: Tensor, generator: torch.Generator | None,
                        hard: bool) -> list[Tensor]:
        latents = self.encode_images(batch[K.TARGET])
        noisy = D.noise_latents(latents, self.backbone.noise_scheduler, generator, timesteps).noisy
        profile = self.encode_images(batch[K.PROFILE])
        masked = self.encode_images(batch[K.TARGET_MASKED])
        prof, targ = self._canvas_features(self.matching, profile, masked, noisy, timesteps,
                                           self.text_states(batch, latents.shape[0]))
        return self.match_flows(prof, targ, hard=hard)

    @torch.no_grad()
    def predict_flow(self, batch: dict, timestep: int | None = None, generator: torch.Generator | None = None,
                     ) -> list[Tensor]:
        """Hard per-level flows for ``batch`` with the target noised to ``timestep`` (feature pixels)."""
        t = self.flow_eval_timestep if timestep is None else timestep
        b = batch[K.TARGET].shape[0]
        timesteps = torch.full((b,), int(t), device=self.device, dtype=torch.long)
        self._mark_graph_step()  # one step of inductor's CUDA graphs, if any (DiffusionTask._mark_graph_step)
        with self._precision_context():  # as sample(): bf16 weights after prepare_inference
            flows = self._matching_flows(batch, timesteps, generator, hard=True)
        return [f.to(torch.float32, copy=True) for f in flows]  # out of the graphs' pool

    def matching_probe_loss(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """Ground-truth flow loss of the Matching Net alone (no generation UNet): a cheap probe of
        how fast the matching can learn, at random timesteps as in training."""
        b = batch[K.TARGET].shape[0]
        timesteps = D.sample_timesteps(b, self.backbone.noise_scheduler, generator).to(self.device)
        self._matching_flows(batch, timesteps, generator, hard=False)
        return self.flow_loss(self._last_soft, batch[K.FLOW_GT], batch.get(K.FLOW_VALID))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if K.FLOW_GT not in batch:
            return
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        flows = self.predict_flow(batch, generator=generator)
        metrics = flow_metrics(flows, self.match_levels, batch, self.pck_alpha)
        bs = batch[K.TARGET].shape[0]
        for name, value in metrics.items():
            self.log(f"val/{name}", value, batch_size=bs, sync_dist=True)
        if batch_idx == 0 and self.trainer is not None and self.trainer.is_global_zero:
            write_flow_images(self.trainer, flows, self.match_levels, batch, self.flow_images)


# ------------------------------------------------------------------------ appearance weights


def _checkpoint_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".ckpt":
        return path
    if path.is_dir():
        from icp.core.checkpointing import resumable_checkpoint

        return resumable_checkpoint(path / "checkpoints") or resumable_checkpoint(path)
    return None


def load_appearance(task: AdaptationTask, path: str | Path, trust_checkpoint: bool = False) -> None:
    """Initialise the Appearance Net (and trained generation-UNet weights) from a stitching run.

    ``path``: a stitching run directory (its newest intact checkpoint), a ``.ckpt`` file, or a
    folder written by ``ControlUNet.to_controlnet().save_pretrained`` (config.json + weights).
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        from diffusers import ControlNetModel

        try:
            # safetensors only: a pickled .bin in a downloaded folder is refused, not unpickled.
            net = ControlNetModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
        except Exception as err:  # noqa: BLE001 -- any loader failure means a bad folder
            raise WeightsError(f"{path}: cannot load the exported Appearance Net ({type(err).__name__}); "
                               "re-export it from the stitching run") from None
        state = net.state_dict()
        mapped = {}
        for k, v in state.items():
            if k.startswith("controlnet_down_blocks."):
                mapped["proj_down." + k.split(".", 1)[1]] = v
            elif k.startswith("controlnet_mid_block."):
                mapped["proj_mid." + k.split(".", 1)[1]] = v
            else:
                mapped["net." + k] = v
        _load_into(task.appearance, mapped, path)
        return
    ckpt = _checkpoint_file(path)
    if ckpt is None:
        raise WeightsError(f"{path}: no stitching checkpoint here (give model.appearance_from a stitching run "
                           "directory, a .ckpt file or an exported Appearance Net folder)")
    from icp.tasks.loading import read_checkpoint

    # weights_only: a stitching checkpoint from someone else cannot run code here (our own hold only
    # tensors and plain values; trust_checkpoint is the explicit opt-out for a pickled one).
    blob = read_checkpoint(ckpt, trust_checkpoint)
    state = blob.get("state_dict", blob)
    app = {k[len("appearance."):]: v for k, v in state.items() if k.startswith("appearance.")}
    if not app:
        raise WeightsError(f"{ckpt}: holds no 'appearance.*' weights; is it a stitching run's checkpoint?")
    _load_into(task.appearance, app, ckpt)
    # Generation-UNet weights the stitching stage trained (LoRA or full) come along when present.
    own = task.state_dict()
    unet = {k: v for k, v in state.items() if k.startswith("backbone.unet.") and k in own
            and own[k].shape == v.shape}
    if unet:
        task.load_state_dict(unet, strict=False)


def _load_into(net: ControlUNet, state: dict, source: Path) -> None:
    own = net.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if bad or missing:
        example = (bad or missing)[0]
        raise WeightsError(f"{source}: Appearance Net weights do not fit this backbone (e.g. '{example}'); use "
                           "the stitching run trained on the same backbone and cond_embedding_channels")
    net.load_state_dict(state)
