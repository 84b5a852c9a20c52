"""CUDA graphs icp records itself: :class:`GraphedStep` (a sampling step replayed after warm-up
calls). Inductor's own graphs (``compile: reduce-overhead``) are marked per step by the task
(``DiffusionTask._mark_graph_step``; ``icp.perf.uses_cudagraphs`` says when)."""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


class GraphedStep:
    """``fn(*tensors) -> tensor`` that becomes a CUDA-graph replay after ``warmup`` real calls.

    For a loop calling ``fn`` with fixed shapes (a sampler's guided prediction): the first
    ``warmup`` calls run eagerly on a side stream, as CUDA graph capture requires (they are real
    steps, so no work is thrown away; compilation and cuDNN algorithm choice happen here); the
    next call captures ``fn`` once, and every call from then on copies its arguments into the
    captured inputs and replays. Each call returns a fresh tensor (schedulers may keep past
    predictions). Inputs that ``fn`` closes over must stay alive and in place for the loop.
    Off CUDA it just calls ``fn``; if capture fails (an op that waits for the host) it logs
    why once and stays eager. Under autocast, the autocast weight cache must be off
    (``torch.autocast(..., cache_enabled=False)``): cached casts would outlive the capture.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._static_in: list[torch.Tensor] = []
        self._static_out: torch.Tensor | None = None
        self._side: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.failed or not args or not args[0].is_cuda:
            return self.fn(*args)
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                return self._side_call(args)
            if not self._capture(args):
                return self.fn(*args)
        for dst, src in zip(self._static_in, args):
            dst.copy_(src)
        self.graph.replay()
        return self._static_out.clone()

    def _side_call(self, args) -> torch.Tensor:
        main = torch.cuda.current_stream()
        self._side = self._side or torch.cuda.Stream()
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            out = self.fn(*args)
        main.wait_stream(self._side)
        out.record_stream(main)
        return out

    def _capture(self, args) -> bool:
        self._static_in = [a.clone() for a in args]
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (a DataLoader's pin-memory thread while a training run
            # samples its grids) may keep using CUDA during the capture.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self.fn(*self._static_in)
        except Exception as err:  # noqa: BLE001 -- any capture failure: run eagerly instead
            self.failed = True
            log.warning("CUDA graph capture failed (%s: %s); sampling continues without it (set "
                        "model.perf.cuda_graph_sampling=false to skip the attempt)", type(err).__name__,
                        str(err).splitlines()[0][:200] if str(err) else "")
            return False
        self.graph, self._static_out = graph, out
        return True
