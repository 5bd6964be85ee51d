"""GradCache (Gao et al. 2021): a loss over a batch larger than one forward's memory.

The batch is split into chunks. Pass 1 runs each chunk without a graph and keeps its
outputs (embeddings, scalar per-chunk terms) and the random state it started from.
The loss over the whole batch is then taken on those outputs as leaves of the outer
graph (the contrastive loss and its learnable temperature live there, so the
temperature's gradient comes from this loss pass). In the backward pass the outputs'
gradients arrive; each chunk is run again, with a graph, from the random state it
started from (dropout masks, sampled negatives: the same as in pass 1), and its
gradient with respect to the trainable parameters is taken with the cached output
gradients (``torch.autograd.grad(outputs, params, grads)``); one chunk's graph is in
memory at a time. The parameters' summed gradients are returned as the gradients of
the parameters given to the autograd function, so each parameter's gradient
accumulates once per step: DDP's hooks and the gradient scaler of mixed precision see
one ordinary backward.

:func:`grad_cache` is generic: ``run(chunk)`` returns (tensors with one row per row of the
chunk, concatenated over the chunks; named scalars, stacked one per chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

ChunkFn = Callable[[Any], tuple[Sequence[torch.Tensor], dict[str, torch.Tensor]]]


class RngState:
    """The CPU generator's state and, on a CUDA device, that device's."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _Autocast:
    """The autocast state of pass 1, entered again for the re-run in backward (which
    runs outside the forward's autocast context)."""

    def __init__(self, device: torch.device):
        self.kind = device.type
        self.enabled = torch.is_autocast_enabled(self.kind)
        self.dtype = torch.get_autocast_dtype(self.kind) if self.enabled else None

    def __call__(self) -> Any:
        return torch.autocast(self.kind, dtype=self.dtype, enabled=self.enabled)


class _GradCacheFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, job: _Job, *inputs: torch.Tensor) -> Any:
        ctx.job = job
        return tuple(o.detach().clone() for o in inputs[: job.n_outputs])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        job: _Job = ctx.job
        params = job.params
        total: list[torch.Tensor | None] = [None] * len(params)
        now = RngState(job.device)
        try:
            for c, chunk in enumerate(job.chunks):
                job.states[c].restore()
                with torch.enable_grad(), job.autocast():
                    rows, scalars = job.run(chunk)
                    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
                    for j, o in enumerate(rows):
                        g = grads[j]
                        if g is not None and o.requires_grad:
                            pairs.append((o, g[job.row_slices[c]]))
                    for j, name in enumerate(job.names):
                        gs, so = grads[len(rows) + j], scalars.get(name)
                        if gs is not None and so is not None and so.requires_grad:
                            pairs.append((so.reshape(()), gs[c]))
                if pairs:
                    got = torch.autograd.grad([o for o, _ in pairs], params, [g.to(o.dtype) for o, g in pairs], allow_unused=True)
                    for i, gi in enumerate(got):
                        if gi is not None:
                            before = total[i]
                            total[i] = gi if before is None else before + gi
                    del got
                del rows, scalars, pairs  # this chunk's graph goes before the next one's
        finally:
            now.restore()  # the backward pass leaves the random stream as it found it
        return (None, *([None] * job.n_outputs), *total)


class _Job:
    """What the backward pass needs: the chunks, their random states, the function."""

    def __init__(
        self,
        run: ChunkFn,
        chunks: list[Any],
        states: list[RngState],
        params: list[nn.Parameter],
        names: list[str],
        n_outputs: int,
        row_slices: list[slice],
        device: torch.device,
    ):
        self.run, self.chunks, self.states, self.params = run, chunks, states, params
        self.names, self.n_outputs, self.row_slices = names, n_outputs, row_slices
        self.device, self.autocast = device, _Autocast(device)


def grad_cache(
    run: ChunkFn, chunks: list[Any], params: list[nn.Parameter], *, device: torch.device
) -> tuple[list[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Pass 1 of every chunk without a graph, wrapped so that the gradient reaching its
    outputs is carried to ``params`` chunk by chunk in backward (see the module).

    ``run(chunk)`` returns (row tensors: one row per row of the chunk, the same number
    every time; named scalars, which a chunk may lack). Returns the row tensors
    concatenated over the chunks and, per name, (values [chunks], present [chunks]:
    whether the chunk had it; 0 where not)."""
    states: list[RngState] = []
    firsts: list[tuple[Sequence[torch.Tensor], dict[str, torch.Tensor]]] = []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            rows, scalars = run(chunk)
            firsts.append((tuple(rows), dict(scalars)))
    n_rows = len(firsts[0][0])
    names = list(dict.fromkeys(n for _, sc in firsts for n in sc))
    cat_rows = [torch.cat([f[0][j] for f in firsts]) for j in range(n_rows)]
    present = {n: torch.tensor([n in sc for _, sc in firsts], device=device) for n in names}
    values = []
    for n in names:
        ref = next(sc[n] for _, sc in firsts if n in sc)
        values.append(torch.stack([sc[n].reshape(()) if n in sc else ref.new_zeros(()) for _, sc in firsts]))
    sizes = [f[0][0].shape[0] for f in firsts]
    starts = [sum(sizes[:c]) for c in range(len(sizes))]
    row_slices = [slice(s, s + n) for s, n in zip(starts, sizes)]
    trainable = [p for p in params if p.requires_grad]
    job = _Job(run, chunks, states, trainable, names, n_rows + len(names), row_slices, device)
    outputs = list(_GradCacheFn.apply(job, *cat_rows, *values, *trainable))
    return outputs[:n_rows], {n: (outputs[n_rows + j], present[n]) for j, n in enumerate(names)}
