"""
--cuda-graph: train.py's whole training step captured once in a CUDA graph and replayed. train.py imports
this module only when the option is given; everything the graph path needs is here.
"""

import functools

import torch


def device_lr(opt, device):
    """Makes opt read its learning rate (and step count: capturable) from the device, where a replayed step
    can see them change; Python floats would be frozen into the graph at capture. Returns the lr tensor."""
    lr = torch.tensor(opt.param_groups[0]["lr"], device=device)
    for group in opt.param_groups:
        group.update(lr=lr, capturable=True)
    return lr


class GraphedStep:
    """A training step captured once in a CUDA graph and then replayed: one launch per step instead of the
    thousands of small kernels of a second-order step, which at batch 64 leave the GPU waiting on Python.
    PyTorch's whole-network recipe: the first steps run eagerly on a side stream (cuBLAS, the allocator and
    --compile must be warm before capture), then the step is captured on a static input buffer. Random
    draws (mask, support set, dropout) stay random across replays: CUDA's generator is graph-aware. Every
    call, warm-up included, is a real training step. Build it after loading any optimizer state.

    step(x=..., autocast=...) -> (loss, logs) is one eager step of `model` with `opt` (train.train_step with
    the model, optimizer and config bound); a GraphedStep is called as step(x, lr)."""

    def __init__(self, step, model, opt, autocast, warmup=3):
        self.step = functools.partial(step, autocast=functools.partial(autocast, cache_enabled=False))  # no weight cache in a graph
        self.lr = device_lr(opt, next(model.parameters()).device)
        self.warmup, self.graph, self.side, self.x, self.out = warmup, torch.cuda.CUDAGraph(), torch.cuda.Stream(), None, None

    def __call__(self, x, lr):
        self.lr.fill_(lr)  # in place: the captured optimizer reads this tensor; no host sync
        if self.warmup:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step(x=x)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.x is None:
            self.x = x.clone()  # the static input every replay reads
            with torch.cuda.graph(self.graph):
                self.out = self.step(x=self.x)
        else:
            self.x.copy_(x)
        self.graph.replay()  # capturing records without running: the capturing call replays too
        return self.out  # static tensors, overwritten by the next replay
