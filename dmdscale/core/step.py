"""One DMD2 iteration with the two time-scale update rule. Plain torch: no Ray, no DeepSpeed.

Iteration `step`:
  1. The generator produces x = G(x_in, t_in, c) from its training input (backward simulation
     for multi-step students, pure noise for one step); with gradients only on generator turns.
  2. Generator turn (step % ttur_ratio == 0): minimise dm_loss + w_g * gan_g + w_r * regression,
     with the critic's parameters frozen (its forward sits inside the generator's backward).
  3. Every iteration: the critic (fake score + head) minimises denoising loss on x.detach()
     + w_d * GAN discriminator loss on real vs generated, in one backward and one optimizer.
Non-finite losses are detected before backward (agreed across ranks by `sync_flag`), reported
in the metrics and skipped.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dmdscale.config import Config
from dmdscale.core import seeds
from dmdscale.core.losses import denoising_loss, dm_loss, gan_critic_loss, gan_generator_loss, regression_loss
from dmdscale.core.optim import OptimizedModule
from dmdscale.core.sampling import NoiseStream, backward_simulate, draw_k, simulation_seed, teacher_sample
from dmdscale.models.base import Cond, Critic, Denoiser, requires_grad


@dataclass
class Batch:
    images: Tensor  # real x0 in the model's space: pixels in [-1, 1], latents, or 2-D points
    cond: Cond = None  # labels / text embeddings / None, one per image
    # (x_in, t_in) already simulated for this iteration by a rollout actor; None: simulate inline.
    generator_input: tuple[Tensor, Tensor] | None = None


@dataclass
class RegressionPairs:
    """Fixed (noise, teacher output) pairs from a deterministic many-step sampler (DMD1)."""

    noise: Tensor
    target: Tensor
    cond: Cond = None

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: Denoiser, noise: Tensor, num_steps: int, cond: Cond = None,
              guidance_scale: float = 1.0) -> "RegressionPairs":
        return cls(noise, teacher_sample(teacher, noise, num_steps, cond, guidance_scale), cond)


class NonFiniteLossError(FloatingPointError):
    """Raised by the training loop after too many consecutive non-finite iterations."""


def _index_cond(cond: Cond, idx: Tensor) -> Cond:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[idx] for k, v in cond.items()}
    return cond[idx]


class DMD2Step:
    """Callable: `metrics = step_fn(batch, step)`."""

    def __init__(self, cfg: Config, teacher: Denoiser, generator_opt: OptimizedModule,
                 critic_opt: OptimizedModule, *, regression_pairs: RegressionPairs | None = None,
                 sync_flag: Callable[[bool], bool] = lambda ok: ok, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        # The networks with their optimizers (plain torch or DeepSpeed engines); the step reads
        # the networks themselves as .generator and .critic.
        self.generator_opt = generator_opt
        self.critic_opt = critic_opt
        self.regression_pairs = regression_pairs
        self.sync_flag = sync_flag
        self.device = torch.device(device)
        self.schedule = teacher.schedule
        self.T = self.schedule.num_train_timesteps
        self.rank, self.world_size = rank, world_size
        # Every rank draws this rank's rows of one global stream, so a global batch gets the
        # same noise however it is split over workers. Backward-simulation noise is seeded per
        # iteration (simulation_seed), apart from the training noise, so the generator's input
        # is never correlated with it and a rollout actor can reproduce it exactly.
        self.rng = NoiseStream(torch.Generator(self.device).manual_seed(seeds.training_noise(cfg.train.seed)), rank, world_size)

    # -- helpers ------------------------------------------------------------------------
    def _autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _randn(self, like: Tensor) -> Tensor:
        return self.rng.randn(tuple(like.shape), like.device, like.dtype)

    def _randint(self, low: int, high: int, n: int) -> Tensor:
        return self.rng.randint(low, high, n, self.device)

    def simulation_rng(self, step: int) -> NoiseStream:
        """The backward-simulation noise of iteration `step` (what a rollout actor is given)."""
        generator = torch.Generator(self.device).manual_seed(simulation_seed(self.cfg.train.seed, step))
        return NoiseStream(generator, self.rank, self.world_size)

    @property
    def generator(self) -> Denoiser:
        return self.generator_opt.module

    @property
    def critic(self) -> Critic:
        return self.critic_opt.module

    def generator_input(self, batch: Batch, step: int) -> tuple[Tensor, Tensor]:
        """(x_in, t_in) the generator trains on at this iteration."""
        if batch.generator_input is not None:
            return batch.generator_input
        timesteps = self.cfg.generator.timesteps
        shape, n = tuple(batch.images.shape), len(batch.images)
        k = draw_k(step, len(timesteps), self.cfg.train.seed) if len(timesteps) > 1 else 0
        if k == 0 or self.cfg.generator.backward_simulation:
            with self._autocast():
                return backward_simulate(self.generator, self.schedule, timesteps, k, shape,
                                         batch.cond, self.simulation_rng(step), self.device, batch.images.dtype)
        # Without backward simulation: noised real data at t_k (the train/inference mismatch
        # that backward simulation removes; kept for the ablation).
        t = torch.full((n,), timesteps[k], dtype=torch.long, device=self.device)
        return self.schedule.add_noise(batch.images, self._randn(batch.images), t), t

    # -- the iteration ----------------------------------------------------------------------
    def __call__(self, batch: Batch, step: int) -> dict[str, float]:
        update_generator = step % self.cfg.train.ttur_ratio == 0
        x_in, t_in = self.generator_input(batch, step)
        with torch.set_grad_enabled(update_generator), self._autocast():
            x = self.generator(x_in, t_in, batch.cond)
        metrics: dict[str, float] = {"generator_updated": float(update_generator)}
        if update_generator:
            metrics |= self.update_generator(x, batch)
        metrics |= self.update_critic(x.detach(), batch)
        return metrics

    def update_generator(self, x: Tensor, batch: Batch) -> dict[str, float]:
        lc, n = self.cfg.loss, len(x)
        # The GAN term runs the critic inside the generator's backward: keep the critic's
        # parameters out of that graph (also required by ZeRO-3 with two engines).
        with requires_grad(self.critic, False), self._autocast():
            t = self._randint(lc.dm_min_step, lc.dm_max_step + 1, n)
            x_t = self.schedule.add_noise(x.detach(), self._randn(x), t)
            with torch.no_grad():
                x0_real = self.teacher(x_t, t, batch.cond, lc.guidance_scale)
                x0_fake = self.critic.fake_score(x_t, t, batch.cond)  # never guided
            # dm_loss's nan_to_num guards 0/0 only; a score network emitting NaN/inf must
            # not be masked by it, so its outputs count towards the finiteness check.
            scores_finite = bool(torch.isfinite(x0_real).all() and torch.isfinite(x0_fake).all())
            losses = {"loss_dm": dm_loss(x, x0_real, x0_fake)}
            total = losses["loss_dm"]
            if lc.gan_generator_weight > 0:
                t_gan = self._randint(0, self.T, n)
                logits = self.critic(self.schedule.add_noise(x, self._randn(x), t_gan), t_gan, batch.cond)
                losses["loss_gan_generator"] = gan_generator_loss(logits)
                total = total + lc.gan_generator_weight * losses["loss_gan_generator"]
            if lc.regression_weight > 0 and self.regression_pairs is not None:
                losses["loss_regression"] = self._regression(n)
                total = total + lc.regression_weight * losses["loss_regression"]
            return self._apply(self.generator_opt, total, losses, "generator", scores_finite)

    def _regression(self, n: int) -> Tensor:
        pairs = self.regression_pairs
        idx = self._randint(0, len(pairs.noise), n)
        t0 = torch.full((len(idx),), self.cfg.generator.timesteps[0], dtype=torch.long, device=self.device)
        pred = self.generator(pairs.noise[idx], t0, _index_cond(pairs.cond, idx))
        return regression_loss(pred, pairs.target[idx], self.cfg.loss.regression_metric)

    def update_critic(self, x_fake: Tensor, batch: Batch) -> dict[str, float]:
        lc, n = self.cfg.loss, len(x_fake)
        fake_score = self.critic.fake_score
        with self._autocast():
            t = self._randint(0, self.T, n)
            noise = self._randn(x_fake)
            pred = fake_score.predict(self.schedule.add_noise(x_fake, noise, t), t, batch.cond)
            target = self.schedule.target(x_fake, noise, t, fake_score.prediction_type)
            losses = {"loss_fake_score": denoising_loss(pred, target)}
            total = losses["loss_fake_score"]
            extra: dict[str, float] = {}
            if lc.gan_critic_weight > 0:
                real = batch.images
                t_fake, t_real = self._randint(0, self.T, n), self._randint(0, self.T, len(real))
                fake_logits = self.critic(self.schedule.add_noise(x_fake, self._randn(x_fake), t_fake),
                                           t_fake, batch.cond)
                real_logits = self.critic(self.schedule.add_noise(real, self._randn(real), t_real),
                                           t_real, batch.cond)
                losses["loss_gan_critic"] = gan_critic_loss(real_logits, fake_logits)
                total = total + lc.gan_critic_weight * losses["loss_gan_critic"]
                extra = {"logits_real": float(real_logits.detach().float().mean()),
                         "logits_fake": float(fake_logits.detach().float().mean())}
            return self._apply(self.critic_opt, total, losses, "critic") | extra

    def _apply(self, target: OptimizedModule, total: Tensor, losses: dict[str, Tensor],
               name: str, inputs_finite: bool = True) -> dict[str, float]:
        """Backward and step unless the loss is non-finite on any rank; report either way."""
        finite = self.sync_flag(inputs_finite and bool(torch.isfinite(total.detach())))
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics[f"nonfinite_{name}"] = float(not finite)
        if not finite:
            target.zero_grad()
            return metrics
        target.backward(total)
        norm = target.step()  # a non-finite gradient norm is skipped by the optimizer wrapper
        metrics[f"grad_norm_{name}"] = norm
        metrics[f"nonfinite_{name}"] = float(not math.isfinite(norm))
        return metrics
