"""Every random stream of a run, named, each derived from `train.seed` in one place.

Streams must not share seeds by accident (correlated noise between backward simulation and
the training input produced artifacts for the DMD2 authors), and several are pure functions
of (seed, step) so every rank, and a rollout actor, draws the same numbers without talking.
Python's hash() is not used: string hashing is salted per process, and ranks are processes.
"""
from __future__ import annotations

_MOD = 2**63


def training_noise(seed: int) -> int:
    """The step's noise and timestep draws (one global stream, split by rank: NoiseStream)."""
    return seed * 7919


def simulation_depth(seed: int, step: int) -> int:
    """Iteration `step`'s backward-simulation depth k."""
    return (seed * 1_000_003 + step) % _MOD


def simulation_noise(seed: int, step: int) -> int:
    """Iteration `step`'s backward-simulation noise, apart from the training noise."""
    return (seed * 2_000_003 + step * 7_919 + 10_000_019) % _MOD


def data_shuffle(seed: int, epoch: int) -> int:
    """A worker's local shuffle of its Ray Data shard in `epoch`."""
    return seed * 1_000_003 + epoch


def evaluation_noise(seed: int) -> int:
    """The fixed noise every evaluation (checkpoint and final) samples the student from."""
    return seed + 99


def evaluation_renoise(evaluation_seed: int) -> int:
    """Re-noising between a multi-step student's evaluation steps."""
    return evaluation_seed + 1


def export_choice(seed: int) -> int:
    """The noise the candidates for the exported weights are compared on (export.choose)."""
    return seed + 7919


def regression_pairs(seed: int) -> int:
    """The noise of DMD1's fixed (noise, teacher output) regression pairs."""
    return seed + 1


def ode_pair_noise(seed: int, shard: int) -> int:
    """The noise of one shard of the regression stage's teacher ODE pairs: a pure function of
    (seed, shard), so a resumed generation writes a missing shard exactly as it would have."""
    return (seed * 4_000_037 + shard * 15_485_863 + 30_000_001) % _MOD


def toy_teacher_fit(seed: int) -> int:
    """toy2d: fitting the MLP teacher network to the exact denoiser."""
    return seed + 17


def gan_augmentation(seed: int, step: int, rank: int) -> int:
    """Iteration `step`'s augmentation of the discriminator's inputs on `rank` (each rank its own
    samples' draws; a pure function so a resumed run draws the same)."""
    return (seed * 3_000_017 + step * 104_729 + rank * 7 + 20_000_003) % _MOD
