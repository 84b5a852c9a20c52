"""The compiled peer (issue 29): what a diffusers user who cares about speed gets by adding
``torch.compile`` to the plain loops of :mod:`icp.bench.plain`, with no icp code in the timed path.

- ``a_peer_<mode>_bsN``: the plain train step with the whole UNet as ``torch.compile(unet)``
  (``default``; ``ro`` = ``mode="reduce-overhead"``, each step marked for inductor's CUDA graphs);
- ``d_peer_<mode>``: the plain ControlNet sampling loop as diffusers' docs compile a pipeline:
  bf16 weights, UNet and control net in channels-last and ``torch.compile(..., fullgraph=True)``,
  the VAE decoder compiled too, in the same mode.

Every target is read against the best of these rows in the same run (icp.bench.report). On CPU
(``--tiny``, tests) the same code compiles with dynamo's ``eager`` backend: the nets are traced as
on the GPU (a graph break under fullgraph fails there too), without AOT autograd or inductor's C++
build, which would cost minutes of a 2-core CI for nothing measured.
A mixin of :class:`icp.bench.train.Bench` (its device, sizes, guard, recording and profiling).
"""

from __future__ import annotations

import torch
from torch import nn

from icp.bench import common, plain
from icp.bench.plan import PEER_MODES


def compile_peer(module: nn.Module, mode: str, device: torch.device, fullgraph: bool = False) -> nn.Module:
    """``torch.compile(module, mode=mode, fullgraph=fullgraph)`` on CUDA; the eager backend elsewhere."""
    if device.type == "cuda":
        return torch.compile(module, mode=mode, fullgraph=fullgraph)
    return torch.compile(module, backend="eager", fullgraph=fullgraph)


class PeerRows:
    def row_a_peer(self) -> None:
        """The compiled train step at each of ``--peer-batches``, in both modes (one row each)."""
        for mode in PEER_MODES:
            for batch in self.size["peer_batches"]:
                name = f"a_peer_{mode}_bs{batch}"
                self.guarded(name, lambda mode=mode, batch=batch: self.peer_train(mode, batch))

    def peer_train(self, mode: str, batch: int) -> None:
        n = self.latent
        settings = {"peer": "torch.compile(unet)", "compile": PEER_MODES[mode]}
        self.plain_train(f"a_peer_{mode}_bs{batch}", batch, (n, n), settings, compile_mode=PEER_MODES[mode])

    def peer_sample(self, mode: str) -> None:
        from diffusers import ControlNetModel

        n, b = self.latent, self.size["sample_batch"]
        parts = self.backbone()
        net = ControlNetModel.from_unet(parts.unet, conditioning_channels=parts.unet.config.in_channels,
                                        conditioning_embedding_out_channels=(64,))
        sampler = plain.PlainSampler(parts, b, (n, n), self.device, steps=self.size["steps"], guidance=7.5,
                                     controlnet=net, weights_dtype=torch.bfloat16,
                                     mark_steps=PEER_MODES[mode] == "reduce-overhead")
        # The same work in both modes; counted eagerly, before compiling (see Bench.plain_train).
        flops = getattr(self, "_peer_sample_flops", None) or common.count_flops(sampler)
        self._peer_sample_flops = flops
        sampler.unet = compile_peer(sampler.unet.to(memory_format=torch.channels_last), PEER_MODES[mode],
                                    self.device, fullgraph=True)
        sampler.controlnet = compile_peer(sampler.controlnet.to(memory_format=torch.channels_last),
                                          PEER_MODES[mode], self.device, fullgraph=True)
        vae = getattr(sampler.codec, "vae", None)  # SD1.5's VAE (the tiny CPU backbone's codec is a pixel one)
        if vae is not None:
            # Not fullgraph: the decoder is one call per image batch, a graph break there costs nothing.
            vae.decoder = compile_peer(vae.decoder, PEER_MODES[mode], self.device)
        settings = {"peer": "torch.compile(unet, controlnet; fullgraph) + vae.decoder", "compile": PEER_MODES[mode],
                    "weights": "bf16", "channels_last": True}
        self.sample_case(f"d_peer_{mode}", sampler, b, settings, flops, 1, self.size["sample_iters"])
