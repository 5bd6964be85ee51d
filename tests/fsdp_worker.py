"""Run by tests/test_fsdp.py under torchrun (2 gloo processes): vlmtune.fsdp's pieces on
a small model, each checked against the same model unsharded. Prints OK at the end."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from vlmtune.fsdp import (
    FsdpSettings,
    full_optimizer_state,
    full_params,
    full_tensors,
    is_sharded,
    load_optimizer_state,
    shard_model,
    shard_weights,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Tiny(nn.Module):
    _no_split_modules = {"Block"}  # a set, as some transformers models have it

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)
        self.extra = nn.Linear(6, 1)  # used only when a batch asks for it
        self.scale = nn.Parameter(torch.tensor(2.0))  # 0-d: fully_shard cannot split it

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x

    def forward(self, x: torch.Tensor, use_extra: bool) -> dict[str, torch.Tensor]:
        h = self.embed(x)
        out = {"main": (self.head(h) * self.scale).pow(2).mean()}
        if use_extra:
            out["extra"] = self.extra(h).abs().mean()
        return out


def main() -> None:
    # FSDP_WORKER_DEVICE=cuda: the same checks on GPUs over NCCL (one GPU per process).
    dev = torch.device(os.environ.get("FSDP_WORKER_DEVICE", "cpu"))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    torch.manual_seed(0)
    ref = Tiny().to(dev)
    model = copy.deepcopy(ref)
    shard_model(model, FsdpSettings())
    assert is_sharded(model) and is_sharded(model.blocks[0]) and not is_sharded(model.head)
    shard_model(model, FsdpSettings())  # a second call keeps the sharding
    local = model.blocks[0].fc.weight.to_local()
    assert local.shape[0] == 6 // world, local.shape  # each process holds its rows only

    # Whole tensors from the shards, on every process.
    names = sorted(ref.state_dict())
    whole = full_tensors(model, names)
    for k in names:
        assert torch.equal(whole[k], ref.state_dict()[k].cpu()), k

    # Training steps where only rank 0's batches use the 'extra' head (DDP's unused
    # parameters): losses and gradients equal one process over both batches.
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        xs = [torch.randn(4, 6, generator=g).to(dev) for _ in range(world)]
        terms = model(xs[rank], use_extra=rank == 0)
        loss = sum(terms.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_loss = sum(sum(ref(x, use_extra=r == 0).values()) for r, x in enumerate(xs)) / world
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        assert abs(total.item() / world - ref_loss.item()) < 1e-5, (step, total.item() / world, ref_loss.item())
    after = full_tensors(model, names)
    for k in names:
        assert torch.allclose(after[k], ref.state_dict()[k].cpu(), atol=1e-5), k

    # Uneven work under full_params: rank 0 makes three forwards and calls a method that
    # is not forward, rank 1 one forward; nothing waits for the other process.
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(5)).to(dev)
    with torch.no_grad(), full_params(model):
        n = 3 if rank == 0 else 1
        for _ in range(n):
            out = model(x, use_extra=False)["main"]
        emb = model.embed(x)
    with torch.no_grad():
        assert torch.allclose(out, ref(x, use_extra=False)["main"], atol=1e-6)
        assert torch.allclose(emb, ref.embed(x), atol=1e-6)
    # ... and training goes on afterwards (no stale prefetch from those forwards).
    loss = sum(model(x, use_extra=True).values())
    loss.backward()
    opt.zero_grad()

    # The optimizer state made whole equals the unsharded optimizer's, and loads back
    # into the shards.
    state = full_optimizer_state(opt.state_dict())
    ref_state = ref_opt.state_dict()
    for i, entry in ref_state["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state["state"][i][key], entry[key].cpu(), atol=1e-5), (i, key)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.05)
    load_optimizer_state(fresh, state)
    again = full_optimizer_state(fresh.state_dict())
    for i in state["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(again["state"][i][key], state["state"][i][key]), (i, key)

    # Whole weights (a checkpoint's) loaded into the sharded model.
    target = {k: torch.full_like(v, 0.5).cpu() for k, v in ref.state_dict().items()}  # as a checkpoint holds them
    model.load_state_dict(shard_weights(model, target))
    assert all(torch.equal(v, target[k]) for k, v in full_tensors(model, names).items())
    dist.barrier()
    if rank == 0:
        print("OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
