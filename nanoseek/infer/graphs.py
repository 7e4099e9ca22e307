"""CUDA-graph decode steps for the inference engine (engine.py): one graph per batch-size bucket,
captured on first use and replayed every step, so a decode step costs one launch instead of one
per kernel (the technique of gpt-fast and vLLM's CUDA graphs). The steps are the model's own
absorbed-attention decode over the MLA latent cache (DeepSeek-V2 report section 2.1), unchanged."""

from __future__ import annotations

import torch


class GraphDecoder:
    """Decode steps replayed from CUDA graphs, one graph per batch-size bucket (1, 2, 4, ...).

    A step attends over the whole cache row (keys past each sequence's position are masked), so
    every shape is static; rows beyond the active ones are free cache rows and take padding.
    `width` 2 is the speculative verify step: two tokens per row through the absorbed path,
    returning the logits and final-normed hidden states of both."""

    def __init__(self, model, cache: dict, max_batch: int, compile: bool = False, width: int = 1):
        self.model, self.cache, self.max_batch, self.width = model, cache, max_batch, width
        # with `compile`, inductor fuses the step's elementwise work before the graph is captured
        self.step = torch.compile(model, dynamic=False) if compile else model
        self.graphs: dict[int, tuple] = {}

    def _bucket(self, n: int) -> int:
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_batch)

    def _capture(self, b: int):
        device = next(self.model.parameters()).device
        tokens = torch.zeros(b, self.width, dtype=torch.long, device=device)
        start = torch.zeros(b, dtype=torch.long, device=device)
        rows = {k: c.rows(0, b) for k, c in self.cache.items()}
        kw = {} if self.width == 1 else dict(return_hidden=True, attn_impl="absorb")
        # warming up writes positions [0, width) of rows [0, b), which may hold active sequences
        saved = [t[:b, :self.width].clone() for c in self.cache.values() for t in c.tensors]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up (and compile) outside the graph
                self.step(tokens, start_pos=start, cache=rows, **kw)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            if self.width == 1:
                out = self.step(tokens, start_pos=start, cache=rows)[:, -1]  # [b, V]
            else:
                out = self.step(tokens, start_pos=start, cache=rows, **kw)  # [b, w, V], [b, w, h]
        for t, keep in zip((t for c in self.cache.values() for t in c.tensors), saved):
            t[:b, :self.width].copy_(keep)
        self.graphs[b] = (graph, tokens, start, out)

    def __call__(self, tokens: torch.Tensor, start: torch.Tensor):
        """tokens [A, 1], start [A] -> logits [A, V] (a view, valid until the next call); with
        `width` 2, tokens [A, 2] -> (logits [A, 2, V], hidden [A, 2, h])."""
        A = tokens.shape[0]
        b = self._bucket(A)
        if b not in self.graphs:
            self._capture(b)
        graph, st, ss, out = self.graphs[b]
        st.zero_()
        ss.zero_()
        st[:A] = tokens
        ss[:A] = start
        graph.replay()
        if self.width == 1:
            return out[:A]
        return out[0][:A], out[1][:A]
