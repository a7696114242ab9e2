"""The samplers of the training tools: batches as a function of the step (:class:`StepBatchSampler`,
so a resumed run replays exactly the batches an uninterrupted run sees, whatever the number of
loader workers), :func:`step_seed` (the seed of a step's random draws) and the validation shards of
the processes of a DDP job (:class:`ShardSampler`)."""

from __future__ import annotations

from typing import Callable, Iterator, List, Tuple, Union

import torch
from torch.utils.data import Sampler

from ..utils import derive_seed


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of the random draws of ``step`` (``stream`` separates independent uses)."""
    return derive_seed(seed, step, stream)


class StepBatchSampler(Sampler):
    """Batches of ``(index, sample_seed)`` for steps ``start_step .. total_steps - 1``.

    The index stream is a concatenation of permutations of the dataset (epoch ``e`` shuffled with
    ``(seed, e)``); step ``s`` takes items ``s*B .. (s+1)*B - 1`` of it. ``len()`` is
    ``total_steps``; iteration starts at ``start_step``. Under DDP each rank takes every ``world_size``-th item of a step's global
    batch of ``B * world_size`` items.
    """

    def __init__(self, num_items: int, batch_size: int, total_steps: int, seed: int = 0,
                 start_step: Union[int, Callable[[], int]] = 0, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.total_steps = int(num_items), int(batch_size), int(total_steps)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self._start = start_step

    @property
    def start_step(self) -> int:
        """Where iteration starts; a callable (e.g. reading the trainer's restored global step)
        is evaluated when iteration begins."""
        return int(self._start() if callable(self._start) else self._start)

    def __len__(self) -> int:
        # the whole run, so that a loop resumed at step k still counts steps from 0 (the
        # iterator itself starts at k)
        return self.total_steps

    def _perm(self, epoch: int) -> List[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, 7))).tolist()

    def batch(self, step: int) -> List[Tuple[int, int]]:
        global_bs = self.batch_size * self.world_size
        out, cache = [], {}
        for j in range(step * global_bs + self.rank, (step + 1) * global_bs, self.world_size):
            epoch, pos = divmod(j, self.n)
            if epoch not in cache:
                cache[epoch] = self._perm(epoch)
            out.append((cache[epoch][pos], derive_seed(self.seed, j, 11)))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)


class ShardSampler(Sampler):
    """The validation samples of one process: ``rank, rank + world, rank + 2 world, ...``. The
    shards are disjoint and cover the set once, without the padding of
    ``torch.utils.data.DistributedSampler`` (which repeats samples to even the shards, and would
    count them twice in the IoU); the IoU's counts are summed over the processes
    (:class:`bev.module.VisibleIoU`, torchmetrics' synced state)."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world = int(num_items), int(rank), int(world_size)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self):
        return len(range(self.rank, self.n, self.world))
