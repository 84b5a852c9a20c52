"""torch.compile of the nets a task declares: by block or whole, with the inductor options the
switches ask for.

What is compiled is declared by the modules themselves, never chosen by class name here:

- a module class sets ``compile_as`` (class attribute) to one of :data:`COMPILE_KINDS`:
  ``"blocks"`` (a net of repeated blocks: by block under ``compile_regional``, whole otherwise;
  the control nets, the VAE codec), or ``"whole"`` (glue of many small eager ops between the nets, compiled as one region each:
  adaptation's fusion and matcher);
- a module that holds nets of another library lists them in ``compiled_nets()`` as
  ``(module, kind)`` pairs (the Backbone's diffusers UNet);
- a net compiled whole whose ``forward`` never runs names the modules that do in
  ``compiled_parts()`` (a VAE codec, called through ``encode``/``decode``: its encoder and decoder).

A subclass inherits its class's declaration, so a new control net built on ``ControlUNet`` is
compiled as one; a new kind of net declares itself.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

from torch import nn

from icp.core.errors import ConfigError
from icp.perf.switches import COMPILE_MODES

BLOCKS, WHOLE = "blocks", "whole"
COMPILE_KINDS = (BLOCKS, WHOLE)


@functools.cache
def regional_blocks() -> tuple[type, ...]:
    """The blocks that repeat through the SD UNet / ControlNet / VAE: compiling these "regionally"
    gives the GroupNorm+SiLU+conv fusions of a whole-model compile at a fraction of the compile
    time. ``Attention`` catches the attention blocks outside transformer blocks (the VAE's mid
    blocks); the ones inside a compiled transformer block are compiled with it."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return ResnetBlock2D, Transformer2DModel, BasicTransformerBlock, Attention


def compile_module(module: nn.Module, mode: str | None = "default", regional: bool = True,
                   backend: str = "inductor", blocks: Iterable[type] | None = None,
                   options: Mapping[str, Any] | None = None) -> int:
    """torch.compile ``module`` in place; returns how many (sub)modules were compiled.

    ``regional=True`` compiles each repeated block (instances of ``blocks``, default
    :func:`regional_blocks`) instead of the whole model: the SD UNet's blocks share code, so
    compile time is a few graphs instead of one huge one, and a graph break in glue code costs
    nothing. ``mode`` None/"none" is a no-op. ``options``: inductor settings over those of ``mode``
    (torch.compile takes one or the other). State-dict keys do not change (``nn.Module.compile``
    compiles in place).
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"perf.compile='{mode}' is not one of {', '.join(str(m) for m in COMPILE_MODES)}")
    if mode in (None, "none"):
        return 0
    import torch._dynamo

    # Many block shapes (320/640/1280 channels x 4 resolutions) share one forward: without a
    # larger cache dynamo would fall back to eager after 8 of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}  # static shapes: what was measured
    if backend == "inductor" and options:
        from torch._inductor import list_mode_options

        kwargs["options"] = {**list_mode_options(mode), **options}
    elif backend == "inductor":
        kwargs["mode"] = mode
    if not regional:
        module.compile(**kwargs)
        return 1
    kinds = tuple(blocks) if blocks is not None else regional_blocks()
    count = 0
    for sub in module.modules():
        if isinstance(sub, kinds) and not getattr(sub, "_icp_compiled", False):
            sub.compile(**kwargs)
            sub._icp_compiled = True
            count += 1
            # Do not also compile the blocks nested inside a compiled block.
            for inner in sub.modules():
                inner._icp_compiled = True
    return count


def inductor_options(s: Mapping[str, Any]) -> dict[str, Any]:
    """Inductor settings the switches ask for (empty: the compile mode's own)."""
    # Inductor decides per graph whether to lay intermediates out channels-last; its heuristics
    # say no for graphs without aten.convolution (every backward graph) and for convolutions with
    # in >= 2x out channels (the UNet's up-block ResNets, after the skip concat).
    return {"force_layout_optimization": True} if s["force_layout_opt"] else {}


def compile_targets(root: nn.Module) -> list[tuple[nn.Module, str]]:
    """The nets ``root`` declares compiled, as ``(module, kind)`` in module order: every submodule
    whose ``compile_as`` is set and every pair a submodule lists in ``compiled_nets()`` (see the
    module docstring). A declared net's own submodules are not searched; each net appears once."""
    out: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()

    def add(net: nn.Module, kind: str) -> None:
        if kind not in COMPILE_KINDS:
            raise ValueError(f"{type(net).__name__}: compile kind {kind!r} is not one of {', '.join(COMPILE_KINDS)}")
        if id(net) not in seen:
            seen.add(id(net))
            out.append((net, kind))

    def visit(module: nn.Module) -> None:
        kind = getattr(module, "compile_as", None)
        if kind is not None:
            add(module, kind)
            return
        listed = getattr(module, "compiled_nets", None)
        for net, net_kind in (listed() if callable(listed) else ()):
            add(net, net_kind)
        for child in module.children():
            if id(child) not in seen:
                visit(child)

    visit(root)
    return out


def called_nets(net: nn.Module) -> list[nn.Module]:
    """What a whole-net compile must wrap: the modules whose ``forward`` runs (``compiled_parts()``
    where the net declares them, e.g. a VAE codec's encoder and decoder), else the net itself."""
    parts = getattr(net, "compiled_parts", None)
    return list(parts()) if callable(parts) else [net]


def compile_plan(task: nn.Module, s: Mapping[str, Any]) -> list[tuple[nn.Module, bool]]:
    """What ``configure_task`` compiles, in order: ``(module, regional)`` pairs. ``whole`` nets
    are compiled whole; the rest as ``compile_regional`` says."""
    plan = []
    for net, kind in compile_targets(task):
        regional = s["compile_regional"] and kind != WHOLE
        plan += [(net, True)] if regional else [(part, False) for part in called_nets(net)]
    return plan
