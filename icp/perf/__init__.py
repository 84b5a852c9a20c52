"""Performance switches of the training tasks (issue 9): one config node, ``model.perf``.

Nothing here changes *what* is computed, only in which precision / memory layout / kernel /
batching; tests/test_perf_*.py check every switch against the plain path on CPU.

- the switches and their defaults: experiments/perf/defaults.yaml (the one table, a comment per
  switch; :data:`DEFAULTS` is read from it); the reason and the measurement behind each default:
  docs/decisions/performance.md (figures in eval/results/bench_train.md);
- :mod:`~icp.perf.switches`: :func:`settings` (merge over the defaults, check), :data:`OFF` (the
  plain path), :func:`guard_accumulation` (no CUDA graphs where gradients accumulate);
- :mod:`~icp.perf.kernels`: bf16 frozen weights, channels-last, the SDPA kernel, wide attention
  heads as matmul, fused AdamW;
- :mod:`~icp.perf.compile`: torch.compile by block or whole, of the nets that modules declare
  (``compile_as`` / ``compiled_nets()`` / ``compiled_parts()``);
- :mod:`~icp.perf.graphs`: :class:`GraphedStep` (a sampling step replayed as a CUDA graph);
- :mod:`~icp.perf.configure`: :func:`configure_task` (training, ``DiffusionTask.setup``) and
  :func:`configure_inference` (evaluation, ``DiffusionTask.prepare_inference``).
"""

from icp.perf.compile import (BLOCKS, COMPILE_KINDS, WHOLE, called_nets, compile_module, compile_plan,
                              compile_targets, inductor_options, regional_blocks)
from icp.perf.configure import configure_inference, configure_task
from icp.perf.graphs import GraphedStep
from icp.perf.kernels import (FUSED_HEAD_LIMIT, MATMUL_SCORES_LIMIT, WideHeadAttention, bf16_frozen, channels_last,
                              frozen_children, fused_optimizer, sdpa_backend, set_sdpa_backend, store_in,
                              wide_head_attention)
from icp.perf.switches import (COMPILE_MODES, DEFAULTS, DEFAULTS_FILE, OFF, REMOVED, REMOVED_TRAIN, SDPA_BACKENDS,
                               guard_accumulation, settings, use_channels_last, uses_cudagraphs)

__all__ = [
    "BLOCKS", "COMPILE_KINDS", "COMPILE_MODES", "DEFAULTS", "DEFAULTS_FILE", "FUSED_HEAD_LIMIT",
    "MATMUL_SCORES_LIMIT", "OFF", "REMOVED", "REMOVED_TRAIN", "SDPA_BACKENDS", "WHOLE", "GraphedStep",
    "WideHeadAttention",
    "bf16_frozen", "called_nets", "channels_last", "compile_module", "compile_plan", "compile_targets",
    "configure_inference", "configure_task", "frozen_children", "fused_optimizer", "guard_accumulation",
    "inductor_options", "regional_blocks", "sdpa_backend", "set_sdpa_backend", "settings", "store_in",
    "use_channels_last", "uses_cudagraphs", "wide_head_attention",
]
