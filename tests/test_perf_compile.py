"""icp.perf.compile: what is compiled is declared by the modules (``compile_as``,
``compiled_nets()``, ``compiled_parts()``), by block or whole; the compiled graphs trace whole
(aot_eager on CPU) and keep the eager results."""

from __future__ import annotations

import pytest
import torch

from icp import perf
from icp.models.backbone import tiny
from tests.perf_helpers import RES, _stitching, _traced_loss_and_grads, _unet_loss
from tests.perf_helpers import _threads  # noqa: F401 (autouse: one thread, the SDPA kernel reset)


def test_regional_compile_counts_blocks_and_keeps_results():
    ref = tiny(resolution=32, width=32, seed=4).unet.eval()
    fast = tiny(resolution=32, width=32, seed=4).unet.eval()
    keys = set(fast.state_dict())
    # aot_eager traces forward and backward like inductor but generates no code: fast on CPU.
    n = perf.compile_module(fast, mode="default", regional=True, backend="aot_eager")
    blocks = [m for m in ref.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    assert n == len(blocks) > 0
    assert set(fast.state_dict()) == keys  # checkpoints of a compiled task load into a plain one
    assert perf.compile_module(fast, mode="none") == 0
    with torch.no_grad():
        a, b = _unet_loss(ref, autocast=False), _unet_loss(fast, autocast=False)
    assert torch.allclose(a, b, rtol=1e-5)


def test_whole_net_compile_wraps_the_modules_that_run():
    """compile_regional=false compiles whole nets: a VAE codec runs encode/decode, never forward,
    so its encoder and decoder are what gets compiled; a UNet is compiled as itself."""
    parts = tiny(resolution=RES, width=32, codec="vae", seed=1)
    assert perf.called_nets(parts.codec) == [parts.codec.vae.encoder, parts.codec.vae.decoder]
    assert perf.called_nets(parts.unet) == [parts.unet]


def test_compile_plan_regional_and_whole():
    """By block (the top level, evaluation): the UNet and the codec by block, the glue whole. Whole
    (compile_regional=false, training's default): every net, the codec as its encoder and decoder."""
    from icp.tasks.adaptation import AdaptationTask

    task = AdaptationTask(tiny(resolution=RES, width=16, codec="vae", seed=6), cond_drop_prob=0.0)
    vae = task.backbone.codec.vae
    plan = {id(m): (type(m).__name__, regional) for m, regional in perf.compile_plan(task, perf.settings())}
    assert plan[id(task.backbone.unet)][1] and plan[id(task.backbone.codec)][1]  # by block
    glue = [id(m) for m, kind in perf.compile_targets(task) if kind == perf.WHOLE]
    assert glue == [id(task.fusion), id(task.matcher)]
    assert all(not plan[i][1] for i in glue)  # glue is compiled whole, also by block
    everything_whole = perf.compile_plan(task, perf.settings({"compile_regional": False}))
    assert not any(regional for _, regional in everything_whole)
    assert [(m, r) for m, r in everything_whole if m in (vae.encoder, vae.decoder)] == [(vae.encoder, False),
                                                                                       (vae.decoder, False)]
    assert all(m is not task.backbone.codec for m, _ in everything_whole)



def test_a_new_net_is_compiled_by_its_own_declaration(monkeypatch):
    """perf names no class: a subclass of a declared net inherits its declaration, a new module
    declares itself (``compile_as``) and a net of another library is listed by the module that
    holds it (``compiled_nets()``). Each is compiled once, as its kind says, with no edit to perf."""
    from icp.models.control import ControlUNet
    from icp.tasks.stitching import StitchingTask

    class LightingNet(ControlUNet):  # a new control net: nothing to declare
        pass

    class Gate(torch.nn.Module):  # new glue between the nets
        compile_as = "whole"

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.scale

    class Holder(torch.nn.Module):  # holds a diffusers net
        def __init__(self, net):
            super().__init__()
            self.net = net

        def compiled_nets(self):
            return [(self.net, "blocks"), (self.net, "blocks")]  # listed twice: compiled once

    class RelightTask(StitchingTask):
        def __init__(self, backbone, **kwargs):
            super().__init__(backbone, **kwargs)
            self.lighting = LightingNet(backbone.unet)
            self.gate = Gate()
            self.extra = Holder(tiny(resolution=RES, width=32, seed=2).unet)

    task = RelightTask(tiny(resolution=RES, width=32, seed=1), cond_drop_prob=0.0)
    targets = {id(m): kind for m, kind in perf.compile_targets(task)}
    assert targets[id(task.lighting)] == "blocks" and targets[id(task.gate)] == "whole"
    assert targets[id(task.extra.net)] == "blocks" and targets[id(task.appearance)] == "blocks"
    assert len(targets) == len(perf.compile_targets(task)) == 5  # + the generation UNet; the pixel codec has no convs
    seen = []
    monkeypatch.setattr(perf.configure, "compile_module",
                        lambda net, mode, regional=True, **_: seen.append((id(net), regional)) or 1)
    applied = perf.configure_task(task, {}, device="cuda")  # the compile path, recorded
    assert applied["compiled"] == 5
    assert sorted(seen) == sorted([(id(task.backbone.unet), True), (id(task.appearance), True),
                                   (id(task.lighting), True), (id(task.gate), False), (id(task.extra.net), True)])

    class Wrong(torch.nn.Module):
        compile_as = "fast"

    with pytest.raises(ValueError, match="compile kind 'fast'"):
        perf.compile_targets(Wrong())


def test_vae_encoder_and_decoder_trace_whole():
    """A whole compile (training's default) hands inductor the VAE encoder and decoder as one graph each, with the
    wide-head matmul attention CUDA gives them: traced here through aot_eager (no C++ compile on
    CPU), no graph break, the same latents and images."""
    import torch._dynamo as dynamo

    codec = tiny(resolution=RES, width=32, codec="vae", seed=2).codec.eval()
    assert perf.wide_head_attention(codec, limit=0, max_scores=2 ** 12) > 0  # chunked, as on CUDA
    images = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref_latents = codec.encode(images)
        ref_images = codec.decode(ref_latents)
        dynamo.reset()
        dynamo.utils.counters.clear()
        for net in perf.called_nets(codec):
            net.compile(backend="aot_eager")
        latents = codec.encode(images)
        decoded = codec.decode(latents)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch.allclose(latents, ref_latents, atol=1e-5) and torch.allclose(decoded, ref_images, atol=1e-5)
    dynamo.reset()


def test_inductor_options_go_over_the_compile_mode(monkeypatch):
    """force_layout_opt reaches torch.compile as an inductor option merged over the mode's own
    (torch.compile takes a mode or options, not both)."""
    assert perf.inductor_options(perf.settings({"force_layout_opt": False})) == {}
    options = perf.inductor_options(perf.settings())  # the default forces the layout
    assert options == {"force_layout_optimization": True}
    # Inductor checks option names when torch.compile is called: these are real ones.
    torch.compile(torch.nn.Linear(2, 2), options=options)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    perf.compile_module(torch.nn.Linear(2, 2), mode="max-autotune-no-cudagraphs", regional=False, options=options)
    perf.compile_module(torch.nn.Linear(2, 2), mode="default", regional=False)
    assert seen[0]["options"] == {"max_autotune": True, "coordinate_descent_tuning": True,
                                  "force_layout_optimization": True} and "mode" not in seen[0]
    assert seen[1]["mode"] == "default" and "options" not in seen[1]


def test_adaptation_glue_modules_are_compile_targets_and_trace_whole():
    from icp.tasks.adaptation import AdaptationTask

    torch.manual_seed(0)
    task = AdaptationTask(tiny(resolution=RES, width=32, seed=6))
    targets = [(type(m).__name__, kind) for m, kind in perf.compile_targets(task)]
    assert targets[-2:] == [("ReferenceFusion", "whole"), ("FlowMatcher", "whole")]
    assert targets.count(("ControlUNet", "blocks")) == 2
    ref, ref_grads = _traced_loss_and_grads(task, task.matching)
    # What inductor is handed on CUDA, traced here through aot_eager (no C++ compile on CPU):
    # one graph each, no break, the same loss and the same Matching Net gradients.
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()
    for glue in (task.fusion, task.matcher):
        glue.compile(backend="aot_eager")
    out, grads = _traced_loss_and_grads(task, task.matching)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch.equal(out, ref) and ref_grads and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    dynamo.reset()


def test_stitching_step_traces_whole_for_the_train_override():
    """What model.perf.compile_regional=false hands inductor for the stitching step:
    the generation UNet and the Appearance Net as one graph each (aot_eager on CPU), no graph
    break, the same loss and Appearance Net gradients as eager."""
    import torch._dynamo as dynamo

    task = _stitching(train_unet="frozen")
    ref, ref_grads = _traced_loss_and_grads(task, task.appearance)
    plan = perf.compile_plan(task, perf.settings({"compile_regional": False}))
    nets = [net for net, regional in plan if not regional]
    assert task.backbone.unet in nets and task.appearance in nets and len(nets) == len(plan)
    dynamo.reset()
    dynamo.utils.counters.clear()
    for net in (task.backbone.unet, task.appearance):
        net.compile(backend="aot_eager")
    out, grads = _traced_loss_and_grads(task, task.appearance)
    assert not dynamo.utils.counters["graph_break"]
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert torch.allclose(out, ref, rtol=1e-5) and ref_grads
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, ref_grads))
    dynamo.reset()
