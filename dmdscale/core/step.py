"""One DMD2 iteration with the two time-scale update rule. Plain torch: no Ray, no DeepSpeed.

Iteration `step`:
  1. The generator produces x = G(x_in, t_in, c) from its training input (backward simulation
     for multi-step students, pure noise for one step); with gradients only on generator turns.
  2. Generator turn (step % ttur_ratio == 0): minimise dm_loss + w_g * gan_g + w_r * regression,
     with the critic's parameters frozen (its forward sits inside the generator's backward);
     then the generator EMAs, if any, take the new weights in.
  3. Every iteration: the critic (fake score + head) minimises denoising loss on x.detach()
     + w_d * GAN discriminator loss on real vs generated, in one backward and one optimizer.
The discriminator sees real and generated images augmented alike (loss.gan_augment) and
noised to t <= loss.gan_max_step; DM and GAN noise levels are drawn by loss.dm_timesteps /
loss.gan_timesteps; with loss.step_conditioned_critic, the critic is told which student step
made x (`Critic.at_step`). Every log step adds diagnostics: by noise level, the teacher/fake-score x0
gap and the discriminator's mean probabilities; every generator turn with the GAN on, the
gradient norms of both terms at the generator's output.
Precision under train.mixed_precision bf16: every forward runs under bf16 autocast on fp32
weights, except the frozen teacher's (bf16 weights) and the DM loss's fake-score pass (fp32);
networks' outputs become x0 in float64 (`NoiseSchedule.to_x0`), as the DMD2 authors do.
Non-finite losses are detected before backward (agreed across ranks by `sync_flag`), reported
in the metrics and skipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from dmdscale.config import Config
from dmdscale.core import seeds
from dmdscale.core.augment import augment
from dmdscale.core.ema import GeneratorEMA
from dmdscale.core.losses import (
    denoising_loss,
    dm_loss,
    f_divergence_weight,
    gan_critic_loss,
    gan_generator_loss,
    regression_loss,
)
from dmdscale.core.optim import OptimizedModule
from dmdscale.core.precision import autocast
from dmdscale.core.sampling import (
    NoiseStream,
    backward_simulate,
    backward_simulate_rows,
    draw_k,
    index_cond,
    row_steps,
    simulation_seed,
    teacher_sample,
)
from dmdscale.core.schedule import TimestepSampler
from dmdscale.core.networks import Cond, Critic, Denoiser, requires_grad


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

    @classmethod
    def for_config(cls, cfg: Config, teacher: Denoiser, shape: tuple[int, ...], num_classes: int | None = None,
                   device: torch.device | str = "cpu") -> "RegressionPairs | None":
        """loss.regression_pairs pairs of `shape` when loss.regression_weight > 0 (else None): the
        noise seeded by train.seed alone, so every rank and every resume builds the same pairs;
        with `num_classes`, labels cycle through the classes."""
        lc = cfg.loss
        if lc.regression_weight == 0:
            return None
        g = torch.Generator().manual_seed(seeds.regression_pairs(cfg.train.seed))
        noise = torch.randn((lc.regression_pairs, *shape), generator=g).to(device)
        labels = (torch.arange(lc.regression_pairs) % num_classes).to(device) if num_classes else None
        return cls.build(teacher, noise, lc.regression_sampler_steps, labels, lc.guidance_scale)


class NonFiniteLossError(FloatingPointError):
    """Raised by the training loop after too many consecutive non-finite iterations."""


class DMD2Step:
    """Callable: `metrics = step_fn(batch, step)`."""

    def __init__(self, cfg: Config, teacher: Denoiser, generator_opt: OptimizedModule,
                 critic_opt: OptimizedModule, *, regression_pairs: RegressionPairs | None = None,
                 ema: GeneratorEMA | None = None, sync_flag: Callable[[bool], bool] = lambda ok: ok,
                 sync_sum: Callable[[Tensor], Tensor] = lambda x: x, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        # The networks with their optimizers (plain torch or DeepSpeed engines); the step reads
        # the networks themselves as .generator and .critic.
        self.generator_opt = generator_opt
        self.critic_opt = critic_opt
        self.regression_pairs = regression_pairs
        self.ema = ema  # updated after every applied generator update
        self.sync_flag, self.sync_sum = sync_flag, sync_sum  # across ranks: all agree / sum
        self.device = torch.device(device)
        self.schedule = teacher.schedule
        self.T = self.schedule.num_train_timesteps
        lc = cfg.loss
        self.dm_timesteps = TimestepSampler(self.schedule, lc.dm_timesteps).to(self.device)
        self.gan_timesteps = TimestepSampler(self.schedule, lc.gan_timesteps).to(self.device)
        self.uniform_timesteps = TimestepSampler(self.schedule, "uniform").to(self.device)
        self.gan_on_generator = lc.gan_generator_weight > 0 or lc.gan_grad_ratio is not None
        # The discriminator's running accuracy (loss.gan_gate_accuracy); None until measured.
        self.d_accuracy: float | None = None
        self.iteration = 0  # the iteration being run (the regression weight's annealing reads it)
        # loss.step_noise_bands: this iteration's student step per row, and each step's band.
        self.band_k: Tensor | None = None
        times = cfg.generator.timesteps
        self.bands = [(times[k + 1] if k + 1 < len(times) else 0, times[k]) for k in range(len(times))]
        self.rank, self.world_size = rank, world_size
        # Every rank draws this rank's rows of one global stream, so a global batch gets the
        # same noise however it is split over workers. Backward-simulation noise is seeded per
        # iteration (simulation_seed), apart from the training noise, so the generator's input
        # is never correlated with it and a rollout actor can reproduce it exactly.
        self.augment_rng = torch.Generator(self.device)  # re-seeded every iteration
        self.rng = NoiseStream(torch.Generator(self.device).manual_seed(seeds.training_noise(cfg.train.seed)), rank, world_size)

    # -- helpers ------------------------------------------------------------------------
    def _full_precision(self):
        """The DM loss's fake-score pass in fp32 under bf16 training, as the DMD2 authors run it
        (main/sd_guidance.py, compute_distribution_matching_loss: outside their autocast, fp32
        weights). Late in training x0_fake - x0_real is about the size of a bf16 forward's
        error times 1/sqrt(abar) (~13 at t = 980); tests/unit/test_precision.py measures it."""
        return torch.autocast(self.device.type, enabled=False)

    def _randn(self, like: Tensor) -> Tensor:
        return self.rng.randn(tuple(like.shape), like.device, like.dtype)

    def _randint(self, low: int, high: int, n: int) -> Tensor:
        return self.rng.randint(low, high, n, self.device)

    def _randindex(self, high: int, n: int) -> Tensor:
        return self._randint(0, high, n)

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
        if len(timesteps) > 1 and self.cfg.generator.step_draw == "row":
            ks = row_steps(step, len(timesteps), self.cfg.train.seed, n, self.rank, self.world_size, self.device)
            if self.cfg.generator.backward_simulation:
                with autocast(self.device, self.cfg.train.mixed_precision):
                    return backward_simulate_rows(self.generator, self.schedule, timesteps, ks, shape, batch.cond,
                                                  self.simulation_rng(step), self.device, batch.images.dtype)
            t = torch.tensor(timesteps, device=self.device)[ks]
            return self.schedule.add_noise(batch.images, self._randn(batch.images), t), t
        k = draw_k(step, len(timesteps), self.cfg.train.seed) if len(timesteps) > 1 else 0
        if k == 0 or self.cfg.generator.backward_simulation:
            with autocast(self.device, self.cfg.train.mixed_precision):
                return backward_simulate(self.generator, self.schedule, timesteps, k, shape,
                                         batch.cond, self.simulation_rng(step), self.device, batch.images.dtype)
        # Without backward simulation: noised real data at t_k (the train/inference mismatch
        # that backward simulation removes; kept for the ablation).
        t = torch.full((n,), timesteps[k], dtype=torch.long, device=self.device)
        return self.schedule.add_noise(batch.images, self._randn(batch.images), t), t

    # -- the iteration ----------------------------------------------------------------------
    def __call__(self, batch: Batch, step: int) -> dict[str, float]:
        update_generator = step % self.cfg.train.ttur_ratio == 0
        diagnose = step % self.cfg.train.log_every == 0
        self.iteration = step
        x_in, t_in = self.generator_input(batch, step)
        # This iteration's augmentation draws (each gan_input call takes fresh ones from it).
        self.augment_rng = torch.Generator(self.device).manual_seed(
            seeds.gan_augmentation(self.cfg.train.seed, step, self.rank))
        with torch.set_grad_enabled(update_generator), autocast(self.device, self.cfg.train.mixed_precision):
            x = self.generator(x_in, t_in, batch.cond)
        metrics: dict[str, float] = {"generator_updated": float(update_generator)}
        # The critic judges this iteration's outputs as step k's (loss.step_conditioned_critic);
        # a shared critic needs no k, and reading it from t_in would sync the device. Per-row
        # steps (generator.step_draw: row) and noise bands read each row's k on the device.
        per_row = self.cfg.generator.step_draw == "row" and len(self.cfg.generator.timesteps) > 1
        row_k = self.row_steps_of(t_in) if per_row or self.cfg.loss.step_noise_bands else None
        self.band_k = row_k if self.cfg.loss.step_noise_bands else None
        k = None
        if self.critic.step_embedding is not None:
            k = row_k if per_row else self.step_index(t_in)
        with self.critic.at_step(k):
            if update_generator:
                metrics |= self.update_generator(x, batch, diagnose)
            metrics |= self.update_critic(x.detach(), batch, diagnose)
        return metrics

    def step_index(self, t_in: Tensor) -> int:
        """Which of the student's steps an iteration trains: the position of its input timestep
        (one for the whole batch: backward simulation draws one depth per iteration)."""
        timesteps = self.cfg.generator.timesteps
        t = int(t_in[0])
        if t not in timesteps:
            raise ValueError(f"generator input at t={t}, not one of generator.timesteps {timesteps}")
        return timesteps.index(t)

    def row_steps_of(self, t_in: Tensor) -> Tensor:
        """(B,) the student step of each row: the position of its input timestep."""
        times = torch.tensor(self.cfg.generator.timesteps, device=t_in.device)
        return (t_in.view(-1, 1) == times.view(1, -1)).long().argmax(1)

    def draw_t(self, sampler: TimestepSampler, low: int, high: int, n: int) -> Tensor:
        """Noise levels in [low, high] by `sampler`; with loss.step_noise_bands, row i's within
        its student step's band too (one uniform index per row, mapped into its band's table)."""
        if self.band_k is None:
            return sampler.draw(low, high, n, self._randindex)
        u = self._randindex(1 << 24, n).to(torch.float64) / (1 << 24)
        t = torch.empty(n, dtype=torch.long, device=self.device)
        for k, (band_low, band_high) in enumerate(self.bands):
            rows = self.band_k == k
            inside = sampler.within(max(low, band_low), min(high, band_high)).to(self.device)
            t = torch.where(rows, inside[(u * len(inside)).long().clamp_max(len(inside) - 1)], t)
        return t

    def gan_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(the discriminator's input, its timesteps): x augmented (loss.gan_augment), then
        noised to t in [0, loss.gan_max_step] (0: the clean image at t = 0)."""
        lc, n = self.cfg.loss, len(x)
        if lc.gan_augment:
            x = augment(x, lc.gan_augment, self.augment_rng)
        if lc.gan_max_step == 0:
            return x, torch.zeros(n, dtype=torch.long, device=x.device)
        t = self.draw_t(self.gan_timesteps, 0, min(lc.gan_max_step, self.T - 1), n)
        return self.schedule.add_noise(x, self._randn(x), t), t

    @torch.no_grad()
    def dm_scores(self, x_t: Tensor, t: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(teacher's CFG x0, fake score's x0) at x_t for the DM loss, float32 from float64
        conversions; the teacher in its stored precision under the step's autocast, the fake
        score in fp32 (`_full_precision`)."""
        with autocast(self.device, self.cfg.train.mixed_precision):
            x0_real = self.teacher(x_t, t, cond, self.cfg.loss.guidance_scale)
        with self._full_precision():
            x0_fake = self.critic.fake_score(x_t, t, cond)  # never guided
        return x0_real, x0_fake

    def update_generator(self, x: Tensor, batch: Batch, diagnose: bool = False) -> dict[str, float]:
        lc, n = self.cfg.loss, len(x)
        metrics: dict[str, float] = {}
        # The GAN term runs the critic inside the generator's backward: keep the critic's
        # parameters out of that graph (also required by ZeRO-3 with two engines).
        with requires_grad(self.critic, False), autocast(self.device, self.cfg.train.mixed_precision):
            t = self.draw_t(self.dm_timesteps, lc.dm_min_step, lc.dm_max_step, n)
            x_t = self.schedule.add_noise(x.detach(), self._randn(x), t)
            x0_real, x0_fake = self.dm_scores(x_t, t, batch.cond)
            # dm_loss's nan_to_num guards 0/0 only; a score network emitting NaN/inf must
            # not be masked by it, so its outputs count towards the finiteness check.
            scores_finite = bool(torch.isfinite(x0_real).all() and torch.isfinite(x0_fake).all())
            if diagnose:
                gap = (x0_real.float() - x0_fake.float()).abs().flatten(1).mean(1)
                metrics |= by_noise_level("diag_x0_gap", gap, self.schedule.sigmas[t])
            weight = None
            if lc.divergence != "reverse_kl":  # f-divergence: the discriminator's density ratio at x_t
                with torch.no_grad():
                    weight = f_divergence_weight(self.critic(x_t, t, batch.cond), lc.divergence)
                metrics["dm_weight_max"] = float(weight.max())
            losses = {"loss_dm": dm_loss(x, x0_real, x0_fake, weight)}
            objective, total = losses["loss_dm"], losses["loss_dm"].detach()
            if self.gan_on_generator:
                x_gan, t_gan = self.gan_input(x)
                losses["loss_gan_generator"] = gan_generator_loss(self.critic(x_gan, t_gan, batch.cond))
                objective, weight, norms = self._gan_generator_objective(x, losses)
                total = total + weight * losses["loss_gan_generator"].detach()
                metrics |= norms
            regression_weight = self.regression_weight()
            if regression_weight > 0 and self.regression_pairs is not None:
                losses["loss_regression"] = self._regression(n)
                objective = objective + regression_weight * losses["loss_regression"]
                total = total + regression_weight * losses["loss_regression"].detach()
                metrics["regression_weight"] = regression_weight
            metrics |= self._apply(self.generator_opt, objective, losses, "generator", scores_finite, total)
        if self.ema is not None and metrics["nonfinite_generator"] == 0:
            self.ema.update()
        return metrics

    def _gan_generator_objective(self, x: Tensor, losses: dict[str, Tensor]) -> tuple[Tensor, float, dict[str, float]]:
        """(a loss whose gradient at x is d DM/dx + w_g d GAN/dx, w_g, gradient-norm metrics).

        The two terms' gradients at the generator's output are taken apart (the GAN one through
        the critic, once) so their norms can be logged and, with loss.gan_grad_ratio, the GAN
        weight set from them; the generator's own backward then starts from their sum.
        """
        lc = self.cfg.loss
        g_dm, = torch.autograd.grad(losses["loss_dm"], x, retain_graph=True)  # x.grad_fn stays for the backward
        g_gan, = torch.autograd.grad(losses["loss_gan_generator"], x, retain_graph=True)
        # Squared norms summed over ranks: the norms of the global batch's gradients (up to the
        # same 1 / world factor), so every rank computes the same weight.
        squares = self.sync_sum(torch.stack([g_dm.float().pow(2).sum(), g_gan.float().pow(2).sum()]))
        norm_dm, norm_gan = (float(v) for v in squares.clamp_min(0).sqrt())
        weight = lc.gan_generator_weight
        if lc.gan_grad_ratio is not None:
            weight = lc.gan_grad_ratio * norm_dm / norm_gan if norm_gan > 0 and math.isfinite(norm_dm / norm_gan) else 0.0
        if lc.gan_weight_cap is not None:
            weight = min(weight, lc.gan_weight_cap)
        gate = self.gan_gate()
        weight *= gate
        grad = (g_dm + weight * g_gan).detach()
        objective = (x.float() * grad.float()).sum()  # d/dx = grad: the generator backward starts here
        return objective, weight, {"gan_weight": weight, "gan_gate": gate, "grad_norm_dm_x": norm_dm,
                                   "grad_norm_gan_x": weight * norm_gan}

    def gan_gate(self) -> float:
        """loss.gan_gate_accuracy's factor on the GAN weight: 0 while the discriminator is at
        chance (or not yet measured), rising linearly to 1 at the configured accuracy."""
        target = self.cfg.loss.gan_gate_accuracy
        if target is None:
            return 1.0
        if self.d_accuracy is None:
            return 0.0
        return min(max((self.d_accuracy - 0.5) / (target - 0.5), 0.0), 1.0)

    def regression_weight(self) -> float:
        """loss.regression_weight, decayed linearly to 0 over loss.regression_anneal_steps."""
        lc = self.cfg.loss
        if lc.regression_anneal_steps is None:
            return lc.regression_weight
        return lc.regression_weight * max(0.0, 1.0 - self.iteration / lc.regression_anneal_steps)

    def _regression(self, n: int) -> Tensor:
        pairs = self.regression_pairs
        idx = self._randint(0, len(pairs.noise), n)
        t0 = torch.full((len(idx),), self.cfg.generator.timesteps[0], dtype=torch.long, device=self.device)
        pred = self.generator(pairs.noise[idx], t0, index_cond(pairs.cond, idx))
        return regression_loss(pred, pairs.target[idx], self.cfg.loss.regression_metric, self.cfg.loss.regression_lowpass)

    def update_critic(self, x_fake: Tensor, batch: Batch, diagnose: bool = False) -> dict[str, float]:
        lc, n = self.cfg.loss, len(x_fake)
        fake_score = self.critic.fake_score
        with autocast(self.device, self.cfg.train.mixed_precision):
            if lc.fake_score_timesteps == "dm":  # where the DM term reads the fake score
                t = self.draw_t(self.dm_timesteps, lc.dm_min_step, lc.dm_max_step, n)
            elif self.band_k is not None:
                t = self.draw_t(self.uniform_timesteps, 0, self.T - 1, n)
            else:
                t = self._randint(0, self.T, n)
            noise = self._randn(x_fake)
            pred = fake_score.predict(self.schedule.add_noise(x_fake, noise, t), t, batch.cond)
            target = self.schedule.target(x_fake, noise, t, fake_score.prediction_type)
            losses = {"loss_fake_score": denoising_loss(pred, target)}
            total = losses["loss_fake_score"]
            extra: dict[str, float] = {}
            if lc.gan_critic_weight > 0:
                fake_in, t_fake = self.gan_input(x_fake)
                real_in, t_real = self.gan_input(batch.images)
                fake_logits = self.critic(fake_in, t_fake, batch.cond)
                real_logits = self.critic(real_in, t_real, batch.cond)
                losses["loss_gan_critic"] = gan_critic_loss(real_logits, fake_logits)
                total = total + lc.gan_critic_weight * losses["loss_gan_critic"]
                extra = {"logits_real": float(real_logits.detach().float().mean()),
                         "logits_fake": float(fake_logits.detach().float().mean())}
                if lc.gan_gate_accuracy is not None:
                    extra["d_accuracy"] = self._track_accuracy(real_logits.detach(), fake_logits.detach())
                if diagnose:  # the discriminator's mean probability of "real", by noise level
                    extra |= by_noise_level("diag_d_real", torch.sigmoid(real_logits.detach().float()),
                                            self.schedule.sigmas[t_real])
                    extra |= by_noise_level("diag_d_fake", torch.sigmoid(fake_logits.detach().float()),
                                            self.schedule.sigmas[t_fake])
            return self._apply(self.critic_opt, total, losses, "critic") | extra

    def _track_accuracy(self, real_logits: Tensor, fake_logits: Tensor, decay: float = 0.9) -> float:
        """The discriminator's accuracy on this update's global batch, folded into the running
        one (every rank holds the same, so the GAN gate is the same on every rank)."""
        correct = (real_logits > 0).float().sum() + (fake_logits < 0).float().sum()
        total = torch.tensor(float(len(real_logits) + len(fake_logits)), device=correct.device)
        correct, total = self.sync_sum(torch.stack([correct, total]))
        accuracy = float(correct / total)
        self.d_accuracy = accuracy if self.d_accuracy is None else decay * self.d_accuracy + (1 - decay) * accuracy
        return accuracy

    def _apply(self, target: OptimizedModule, objective: Tensor, losses: dict[str, Tensor],
               name: str, inputs_finite: bool = True, total: Tensor | None = None) -> dict[str, float]:
        """Backward `objective` and step unless the loss (`total`, default the objective) is
        non-finite on any rank; report either way."""
        total = objective if total is None else total
        finite = self.sync_flag(inputs_finite and bool(torch.isfinite(total.detach())))
        metrics = {k: float(v.detach()) for k, v in losses.items()}
        metrics[f"nonfinite_{name}"] = float(not finite)
        if not finite:
            target.zero_grad()
            return metrics
        target.backward(objective)
        norm = target.step()  # a non-finite gradient norm is skipped by the optimizer wrapper
        metrics[f"grad_norm_{name}"] = norm
        metrics[f"nonfinite_{name}"] = float(not math.isfinite(norm))
        return metrics


# Noise-level buckets of the diagnostics, in sigma = sqrt((1 - abar) / abar): nearly clean,
# fine detail, coarse structure, mostly noise.
SIGMA_BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 2.0), (2.0, math.inf))


def by_noise_level(name: str, values: Tensor, sigmas: Tensor) -> dict[str, float]:
    """Mean of per-sample `values` in each sigma bucket that holds samples:
    {"<name>_sigma_<lo>-<hi>": mean}."""
    out = {}
    sigmas = sigmas.to(values.device)
    for lo, hi in SIGMA_BUCKETS:
        inside = (sigmas >= lo) & (sigmas < hi)
        if inside.any():
            out[f"{name}_sigma_{lo:g}-{hi:g}"] = float(values[inside].mean())
    return out
