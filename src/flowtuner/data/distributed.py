"""Dealing the training data to several processes, the same run for any number of them.

The global stream of micro-batches is BatchPlan's order, a pure function of (seed, epoch), whatever the
world size. Rank r of W takes global micro-batches start + r, start + r + W, ... of each epoch; the tail
of an epoch that cannot give every rank one more micro-batch is dropped, so every rank runs the same number
of steps (a rank that ran one more would wait forever in the gradient all-reduce). The position a run saves
is the global micro-batch index within the epoch, so a run resumed with another world size starts exactly
after the micro-batches already consumed. The noise of a micro-batch is drawn from a generator seeded by
(seed, epoch, global index): which process trains a micro-batch does not change its noise or timestep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from flowtuner.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Shard":
        """From the variables torchrun and `accelerate launch` set for every process they start."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def deal(self, n: int, start: int = 0) -> range:
        """Global indices of the micro-batches this rank trains in an epoch of `n`, from global index `start` on."""
        return range(start + self.rank, epoch_end(n, start, self.world), self.world)

    def batches_per_epoch(self, n: int) -> int:
        """Micro-batches each rank trains in a whole epoch of `n`."""
        if n < self.world:
            raise ConfigError(f"the datasets give {n} batches per epoch, fewer than the {self.world} training processes; "
                              "use fewer processes, a smaller batch_size or more num_repeats.")
        return n // self.world


def refuse_several_processes(command: str) -> None:
    """Caches are written by one process and read by every training process: a caching command started by a
    multi-process launcher would write each file several times at once."""
    world = Shard.from_env().world
    if world > 1:
        raise ConfigError(f"{command} runs in one process (started as one of {world}); run it once without torchrun / "
                          "accelerate launch, then launch the training processes, which all read the same caches.")


def epoch_end(n: int, start: int, world: int) -> int:
    """The global index after the last micro-batch trained in an epoch of `n` dealt from `start` to `world`
    ranks: the tail short of one micro-batch for every rank is dropped."""
    return start + world * max(0, (n - start) // world)


def noise_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the noise and timestep draws of global micro-batch `index` of `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])
