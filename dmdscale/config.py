"""Typed run configuration: YAML file + `--quick` overrides + dotted `key=value` overrides.

Every key is validated before any work starts; a bad value raises `ConfigError` naming the
dotted key and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmdscale.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or out of range; the message names the dotted key."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a sweep must not silently train the default.
    # Each field's docstring is its description (docs/configuration.md is generated from them).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    family: str = "toy2d"
    """The teacher family: a name in `dmdscale.families.FAMILIES` (toy2d, unet2d, sd15, sdxl, sd3, flux,
    qwenimage), checked there (`families.resolve`); see docs/families.md."""
    teacher: str = "analytic"
    """Local diffusers folder or hub id (loaded with `from_pretrained`); `analytic` for toy2d; `train` for unet2d:
    dmdscale trains a teacher on `data.path` (cached by its config)."""


class TeacherTrainingConfig(_Section):
    """How dmdscale trains its own class-conditional UNet teacher (model.teacher: train)."""

    steps: int = Field(800, ge=1)
    """Training steps of the UNet teacher dmdscale trains (DDPM schedule, EMA weights) when `model.teacher: train`.
    Measured on 2 CPU cores: width 32, 800 steps of batch 64 take ~3.5 min and give clean 16x16 digits from 50 DDIM
    steps; width 16, 250 steps (~30 s) recognisable ones."""
    batch_size: int = Field(64, ge=1)
    """Batch size of the teacher's training."""
    lr: float = Field(2e-3, gt=0)
    """Learning rate of the teacher's training."""
    width: int = Field(32, ge=8)
    """The teacher UNet's first block's channels."""
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    """`v_prediction` by default: an eps teacher this small gave pure noise on 32% of 1-step seeds at t=999 (eps ->
    x0 divides by sqrt(alpha_bar) ~ 0.006), which the student inherits."""


class Toy2dConfig(_Section):
    """The analytic harness: a mixture of isotropic Gaussians with means on a circle."""

    num_modes: int = Field(8, ge=2)
    """Gaussians in the mixture."""
    mode_std: float = Field(0.1, gt=0)
    """Standard deviation of each Gaussian."""
    radius: float = Field(2.0, gt=0)
    """Radius of the circle the Gaussians' means lie on."""
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    """The diffusers beta schedule of the toy. The cosine schedule spends more timesteps at the noise levels (sigma
    ~ mode spacing) where a 2-D mixture's structure is decided than DDPM's linear one."""
    hidden_dim: int = Field(128, ge=8)
    """Width of the generator and fake-score MLPs (toy2d.yaml: 256)."""
    num_layers: int = Field(3, ge=1)
    """Layers of the generator and fake-score MLPs (toy2d.yaml: 4)."""
    init_steps: int = Field(1500, ge=0)
    """DMD2 initialises generator and fake score from the teacher network. The toy teacher is a formula, so an MLP
    is first fitted to it for this many steps (0: random init)."""


class DataConfig(_Section):
    path: str = "digits"
    """Parquet file/folder or image folder (`metadata.jsonl`); `digits` builds scikit-learn's digits as Parquet with
    a held-out split under `cache_dir`. Text-to-image stages without the GAN also take prompts alone (a `.txt` file,
    one prompt per line, or Parquet with a `prompt` column). On a cluster: a path every node can read."""
    eval_path: str | None = None
    """Held-out real images for FID (default: `data.path`; digits: its test split)."""
    resolution: int = Field(16, ge=4)
    """Images are resized to this side."""
    channels: Literal[1, 3] = 1
    """Images are converted to 1 (L) or 3 (RGB) channels."""
    num_classes: int = Field(10, ge=1)
    """Class-conditional models: labels in [0, num_classes)."""
    materialize: Literal["auto", "always", "never"] = "auto"
    """Keep the decoded data set in Ray's object store across epochs: `auto` when it takes at most a quarter of the
    store (digits: 1.5 MB), `always`, or `never` (each epoch streams from the source). Text-to-image families
    without `data.latent_cache` keep their encoded rows there (always on GPUs, so the encoders are done before the
    trainers take the GPUs)."""
    latent_cache: str | None = None
    """Text-to-image families: a folder the VAE latents and text embeddings are written to as Parquet once and
    streamed from afterwards (the VAE and text encoders never reload); a cache made for another teacher, data set or
    resolution is refused by name. Set one for data sets larger than the object store."""
    encode_actors: int = Field(1, ge=1)
    """Text-to-image families: the Ray Data actor pool that holds the VAE and text encoders and computes the latents
    and text embeddings (a GPU each when `scale.use_gpu`)."""
    encode_batch_size: int = Field(16, ge=1)
    """Rows per batch on the encoding actors."""


class GeneratorConfig(_Section):
    timesteps: list[int] = Field(default_factory=lambda: [999])
    """Timesteps the student is conditioned on, in sampling order: 1 to 4, strictly decreasing, each in [0, 999],
    e.g. `[999]` or `[999, 749, 499, 249]`."""
    backward_simulation: bool = True
    """Multi-step students: train on the student's own rollouts (true) or on noised real data."""
    step_draw: Literal["batch", "row"] = "batch"
    """Which student step each row trains: `batch`: one step drawn per iteration for the whole batch; `row`: every
    batch holds rows of every step in equal shares (each row simulated to its own depth, a step-conditioned critic
    told each row's step; the DMD2 authors' later CausVid code), so every critic update sees every step. Inline
    rollouts only."""

    @field_validator("timesteps")
    @classmethod
    def _check_timesteps(cls, v: list[int]) -> list[int]:
        if not 1 <= len(v) <= 4:
            raise ValueError(f"must list 1 to 4 timesteps, got {len(v)}")
        if any(t < 0 or t > 999 for t in v):
            raise ValueError(f"each timestep must be in [0, 999], got {v}")
        if any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {v}")
        return v


class LoraConfig(_Section):
    """LoRA on the generator's UNet through peft; the critic stays fully trained, as in the
    DMD2 authors' SDXL LoRA run. Targets: the authors' list (attention, convs, ff, time proj)."""

    enabled: bool = False
    """Train a peft LoRA adapter on the generator instead of a full fine-tune (text-to-image families); its base
    stays frozen, the critic trains in full. Not with `rollout.mode: actors`."""
    rank: int = Field(64, ge=1)
    """LoRA rank r."""
    alpha: float = Field(8.0, gt=0)
    """LoRA alpha."""
    targets: list[str] = Field(default_factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"])
    """Module names the adapter wraps: the authors' list (attention projections, feed-forward, resnet convs,
    samplers, time projections); sd3.yaml and flux.yaml list transformer targets."""


class TrainConfig(_Section):
    max_steps: int = Field(2000, ge=1)
    """Iterations (critic updates)."""
    batch_size: int = Field(256, ge=1)
    """Global batch, split across workers: a multiple of `scale.num_workers`."""
    ttur_ratio: int = Field(5, ge=1)
    """Critic updates per generator update (two time-scale update rule)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate of the generator, and of the critic unless `train.critic_lr` is set."""
    critic_lr: float | None = Field(None, gt=0)
    """The critic's (fake score + discriminator head) own learning rate; none: `train.lr` (the paper sets both
    equal)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas, each in [0, 1)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(500, ge=0)
    """Linear LR warm-up over this many iterations for both players, then `train.lr_decay`; the generator's clock
    counts iterations, not its own updates (the authors step its scheduler every iteration)."""
    lr_decay: Literal["constant", "cosine"] = "constant"
    """After the warm-up: `constant` (the paper's) or `cosine`: a half cosine to 0 at `train.max_steps`, for both
    players, on the iteration clock (settles a short run's last weights)."""
    grad_clip: float = Field(10.0, gt=0)
    """Gradient-norm clipping."""
    mixed_precision: Literal["no", "bf16"] = "no"
    """`no` (also written `fp32`, or `false`, as YAML reads an unquoted `no`) or `bf16`: forwards under bf16
    autocast on fp32 generator/critic weights (fp32 DeepSpeed engines), the frozen teacher stored in bf16, the DM
    loss's fake-score pass in fp32, as the DMD2 authors do (docs/scaling.md, "Precision")."""
    gradient_checkpointing: bool = False
    """Recompute the generator's and fake score's activations in backward."""
    seed: int = 0
    """Seeds everything, including the backward-simulation k shared by all ranks."""
    ema_decays: list[float] = Field(default_factory=list)
    """Exponential moving averages of the generator's weights, one per decay (per generator update, warmed up as
    min(decay, (1 + k) / (10 + k))): kept in checkpoints, evaluated at each checkpoint and at the end next to the
    raw weights (`fid_student_ema_0.97`, `fid_student_raw`); `export.ema` picks the one exported as the student.
    ZeRO 0-2. A decay the warm-up never reaches in the run (0.97 needs 290 updates) gives the warm-up's own average,
    and the driver says so."""
    ema_power: float | None = Field(None, ge=0)
    """The EMAs' warm-up: none for (1 + k) / (10 + k); a power p for EDM2's power-function profile min(decay, (1 - 1
    / (k + 1))^(p + 1)), which weighs update j as about j^p: an average over a share of the run (digits.yaml: 3)."""
    init: str | None = None
    """Start a new stage from another run: its folder (`stage/`: the raw generator, the critic and the EMAs, which
    continue) or an exported student folder (the generator only). Optimizers, LR warm-up and data position start
    afresh with this run's settings; a folder that is neither stops before any work."""
    init_ema: float | None = Field(None, gt=0, lt=1)
    """With `train.init` a run folder: the generator starts from that run's EMA of this decay (e.g. 0.97, what it
    exported) instead of its raw weights; the critic and EMAs load as before. On digits a 1-step run's EMA ends 1-9
    FID ahead of its raw weights."""
    max_nonfinite_steps: int = Field(10, ge=0)
    """Consecutive non-finite iterations tolerated (each is skipped) before the run stops."""
    log_every: int = Field(50, ge=1)
    """Metrics to MLflow and Ray Train every this many iterations."""
    checkpoint_every: int = Field(200, ge=1)
    """Iterations between Ray Train checkpoints (DeepSpeed engines of generator and critic, RNG, data position);
    each is also evaluated on the evaluation actors."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints Ray keeps (the latest ones)."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts Ray Train makes after a failure (each resumes from the latest checkpoint) before the
    run fails: `FailureConfig(max_failures)`."""

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if any(not 0 <= b < 1 for b in v):  # torch's Adam raises on the worker, naming no key
            raise ValueError(f"each of Adam's betas must be in [0, 1), got {list(v)}")
        return v

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _full_precision_aliases(cls, v: Any) -> Any:
        # `train.mixed_precision=no` as the docs write it: YAML 1.1 reads an unquoted no as false.
        if v is False or (isinstance(v, str) and v.lower() in ("no", "fp32", "false")):
            return "no"
        if isinstance(v, str) and v.lower() == "bf16":
            return "bf16"
        raise ValueError(f"choose no (or fp32) for full precision, or bf16")

    @field_validator("init")
    @classmethod
    def _absolute_init(cls, v: str | None) -> str | None:
        # Ray's train workers run in another directory: a path relative to the driver's would
        # not be found there.
        return None if v is None else str(Path(v).expanduser().absolute())

    @field_validator("ema_decays")
    @classmethod
    def _check_decays(cls, v: list[float]) -> list[float]:
        if any(not 0 < d < 1 for d in v):
            raise ValueError(f"each decay must be in (0, 1), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"decays must be distinct, got {v}")
        return v


class LossConfig(_Section):
    guidance_scale: float = Field(1.0, ge=0)
    """CFG scale on the teacher (real score) only; the fake score is never guided. FLUX.1-dev: the teacher's
    embedded guidance (one forward)."""
    gan_generator_weight: float = Field(0.0, ge=0)
    """w_g, the generator's GAN loss weight (with `loss.gan_grad_ratio` it only switches the term on)."""
    gan_critic_weight: float = Field(0.0, ge=0)
    """w_d, the discriminator loss in the critic's objective."""
    regression_weight: float = Field(0.0, ge=0)
    """DMD1's regression loss (off in DMD2) on fixed teacher ODE pairs, for the unet2d and toy2d families (text
    families: the regression stage, `regression.enabled`); digits: 0.01-0.03 puts it at 0.3-1x the DM gradient;
    toy2d.yaml: 1 on 8192 pairs. Every train worker builds the pairs at start (1024 x 50 teacher steps: minutes on
    CPU)."""
    regression_metric: Literal["pseudo_huber", "mse"] = "pseudo_huber"
    """The regression term's distance: `pseudo_huber` or `mse`."""
    regression_pairs: int = Field(1024, ge=1)
    """(noise, teacher DDIM output) pairs for the regression term."""
    regression_sampler_steps: int = Field(50, ge=2)
    """The teacher's DDIM steps per regression pair."""
    dm_min_step: int = Field(20, ge=0, le=999)
    """DM loss noise levels: t in [dm_min_step, dm_max_step] = [0.02 T, 0.98 T], drawn by `loss.dm_timesteps`."""
    dm_max_step: int = Field(980, ge=0, le=999)
    """Upper end of the DM loss's timesteps (see `loss.dm_min_step`)."""
    dm_timesteps: Literal["uniform", "karras"] = "uniform"
    """How the DM noise levels are drawn within their range: `uniform` in t, or `karras`: uniformly by index on
    EDM's sigma grid (rho 7, sigma 0.002..80) mapped onto this schedule's timesteps, which puts far more draws at
    low noise (25% of draws below sigma 0.17 on a linear-beta schedule, against 5%; the authors' pixel-space
    ImageNet code)."""
    gan_timesteps: Literal["uniform", "karras"] = "uniform"
    """How the GAN terms' noise levels are drawn: `uniform` or `karras`, as for `loss.dm_timesteps`."""
    gan_max_step: int = Field(999, ge=0, le=999)
    """Real and generated images are noised to t in [0, gan_max_step] before the discriminator (the authors'
    diffusion_gan_max_timestep); 0: clean images."""
    gan_grad_ratio: float | None = Field(None, gt=0)
    """When set, the generator's GAN weight is recomputed every generator update so that |w_g * dGAN/dx| =
    gan_grad_ratio * |dDM/dx| at the generator's output (gradient norms over the global batch; both logged:
    `grad_norm_dm_x`, `grad_norm_gan_x`, `gan_weight`); `loss.gan_generator_weight` then only switches the term on."""
    gan_head: Literal["conv", "full"] = "conv"
    """The discriminator head on the fake score's bottleneck: `conv` (one strided 3x3 conv + 1x1) or `full` (the
    authors': two full-width 4x4 stride-2 convs with GroupNorm + SiLU, then a 1x1 to one logit)."""
    gan_feature_depths: list[int] = Field(default_factory=list)
    """Transformer teachers (sd3, flux): the blocks (1-based) whose image tokens the discriminator reads, one small
    MLP head per depth (`TokenHead`, every token's logit averaged); empty: the middle block. Several depths: NVIDIA
    FastGen's tip for transformer teachers. UNet families read their mid block and refuse it."""
    gan_augment: list[Literal["flip", "shift", "cutout"]] = Field(default_factory=list)
    """Differentiable augmentation (DiffAugment: `flip`, `shift`, `cutout`) of the discriminator's real and
    generated inputs alike, against discriminator overfitting on small data sets (for digits `[shift, cutout]`: a
    mirrored digit is another digit; digits.yaml leaves it off)."""
    fake_score_timesteps: Literal["uniform", "dm"] = "uniform"
    """The fake score's own noise levels: `uniform` in t over [0, T) (the authors' SD code), or `dm`: drawn as the
    DM term draws them (`loss.dm_timesteps` within [dm_min_step, dm_max_step]), the authors' EDM recipe: the fake
    score is trained where the DM term reads it."""
    divergence: Literal["reverse_kl", "forward_kl", "jensen_shannon"] = "reverse_kl"
    """The divergence the DM gradient descends (Xu et al. 2025, f-distill): `reverse_kl` is DMD's (mode-seeking);
    `forward_kl` and `jensen_shannon` weight each sample's DM gradient by h(r) = r and r / (1 + r) of the density
    ratio r = p_data / p_student = exp(logit) that the discriminator estimates at the DM noise level (weights
    divided by their batch mean; `dm_weight_max` logged), so regions the student under-covers pull harder. Needs the
    discriminator (`loss.gan_critic_weight` > 0)."""
    gan_gate_accuracy: float | None = Field(None, gt=0.5, le=1)
    """Gates the generator's GAN weight while the discriminator cannot tell real from generated: scaled by clamp((a
    - 0.5) / (gan_gate_accuracy - 0.5), 0, 1), a the discriminator's running accuracy (real logits > 0, generated <
    0, averaged over recent critic updates; logged as `d_accuracy`, the factor as `gan_gate`): 0 at chance, full
    from gan_gate_accuracy on. None: no gate."""
    gan_weight_cap: float | None = Field(None, gt=0)
    """An upper bound on the (calibrated) GAN weight."""
    regression_lowpass: int = Field(1, ge=1)
    """DMD1's regression term as a coarse anchor: both images average-pooled by this factor before the metric (2: 16
    px digits compared at 8 px), so the student keeps the teacher's global statistics (brightness, colour, layout)
    while the DM and GAN terms shape the detail."""
    regression_anneal_steps: int | None = Field(None, ge=1)
    """The regression weight decays linearly to 0 over this many iterations (none: constant)."""
    step_noise_bands: bool = False
    """Multi-step students: step k's DM, fake-score and GAN noise levels are drawn in its own band [t_{k+1}, t_k]
    (the last step's: [0, t_{K-1}]), intersected with each term's range, as TDM and Phased DMD confine each step to
    its part of the trajectory."""
    step_conditioned_critic: bool = False
    """Multi-step students: the critic learns an embedding of the student's step (zero at the start, added to the
    fake score's time embedding), so the DM and GAN terms match each step's outputs to the data, not only the
    mixture of all steps' outputs that a shared critic models (matching that mixture lets single steps drift). On
    digits, with `train.critic_lr` 2e-3 in a second stage of 500 iterations: 4-step FID 26.6 -> 11.2 (seed 0) and
    31.1 -> 14.5 (seed 1); the full recipe in docs/families.md."""

    @model_validator(mode="after")
    def _check_range(self) -> "LossConfig":
        if self.dm_min_step > self.dm_max_step:
            raise ValueError(
                f"dm_min_step ({self.dm_min_step}) must be <= dm_max_step ({self.dm_max_step})"
            )
        return self


class RegressionConfig(_Section):
    """A regression stage instead of DMD2 (the DMD2 authors' SDXL 1-step recipe): the teacher's
    deterministic many-step sampler with CFG (loss.guidance_scale) turns the prompts of data.path
    into (noise, text embedding, teacher output) pairs on a Ray actor pool, written as Parquet
    shards; the generator then learns to map each noise to its teacher output in one step at
    generator.timesteps[0]. The run folder's stage/ is what the DMD2 stage's train.init takes."""

    enabled: bool = False
    """Run the regression stage instead of DMD2 (text-to-image families): teacher ODE pairs, then a 1-step generator
    regressed on them; its `stage/` is the next stage's `train.init` (docs/families.md, "Recipe stages")."""
    pairs_path: str | None = None
    """Where the pair shards go (a folder every node can write); none: `<out>/ode_pairs`. A rerun writes only the
    shards missing there, so an interrupted generation resumes; pairs made with other settings are refused."""
    num_pairs: int = Field(10_000, ge=1)
    """Pairs to make (the authors' 10K); the prompts are cycled."""
    shard_size: int = Field(256, ge=1)
    """Pairs per Parquet shard: the unit of work and of resume."""
    sampler_steps: int = Field(50, ge=2)
    """The teacher's DDIM steps per pair (with CFG `loss.guidance_scale`)."""
    sample_batch_size: int = Field(8, ge=1)
    """Pairs per teacher forward on an actor."""
    num_actors: int = Field(1, ge=1)
    """Pair-making Ray actors; each holds the teacher UNet and text encoder(s)."""
    actor_cpus: float = Field(1.0, gt=0)
    """CPUs per pair-making actor."""
    actor_gpus: float = Field(1.0, ge=0)
    """GPU share per pair-making actor when `scale.use_gpu`."""
    metric: Literal["pseudo_huber", "lpips"] = "pseudo_huber"
    """The regression distance: `pseudo_huber` on latents (no weights needed), or `lpips` on VAE-decoded images (the
    authors' choice), which needs `regression.lpips_weights`."""
    lpips_weights: str | None = None
    """A local VGG LPIPS state dict, required by `regression.metric: lpips` (saved once where downloads work:
    `torch.save(lpips.LPIPS(net="vgg").state_dict(), FILE)`); nothing is downloaded."""

    @model_validator(mode="after")
    def _check_lpips(self) -> "RegressionConfig":
        if self.metric == "lpips" and self.lpips_weights is None:
            raise ValueError("regression.metric 'lpips' needs regression.lpips_weights: a local LPIPS state dict "
                             "(lpips.LPIPS(net='vgg').state_dict() saved with torch.save); or use 'pseudo_huber'")
        return self


class RolloutConfig(_Section):
    """Where backward simulation runs for multi-step students (one-step students never simulate)."""

    mode: Literal["inline", "actors"] = "inline"
    """Where multi-step students' backward simulation runs: `inline`: the trainer simulates with its own generator
    (the reference); `actors`: a pool of Ray actors per train worker, each holding a generator copy, simulates ahead
    of the trainer. With staleness 0 both give the same rollouts for the same seeds."""
    num_actors: int = Field(1, ge=1)
    """Rollout actors per train worker."""
    publish_every: int = Field(1, ge=1)
    """Rank 0 publishes the generator's weights every this many generator updates."""
    max_staleness: int = Field(1, ge=0)
    """A rollout made with weights more than this many versions old is dropped and redone."""
    lookahead: int = Field(2, ge=1)
    """Iterations requested ahead of the trainer."""
    actor_cpus: float = Field(0.5, gt=0)
    """CPUs per rollout actor."""
    actor_gpus: float = Field(0.25, ge=0)
    """Fraction of its worker's GPU per rollout actor when `scale.use_gpu`."""


class ScaleConfig(_Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers, one GPU each when `scale.use_gpu`; resuming needs the same number."""
    use_gpu: bool = False
    """Train on GPUs: one per train worker; side actors take the GPU fractions their sections set."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage (0-3) of the generator's and the critic's engines."""
    offload_optimizer: bool = False
    """Offload the optimizer states to CPU (DeepSpeed)."""
    shard_teacher: bool = False
    """Partition the frozen teacher over the ranks as ZeRO-3 partitions generator and critic (ZeRO-3 inference:
    gathered block by block in its forwards), instead of a whole copy on every rank: a teacher larger than one GPU
    (8-12B flow transformers) then fits. Costs an all-gather of the teacher's weights per forward. Needs
    `scale.zero_stage` 3. The run reports `teacher_parameters_per_rank`."""
    data_cpus: float = Field(1.0, gt=0)
    """CPUs left to Ray Data on each node; the train workers share the rest (no deadlock on 2 CPUs: one each)."""
    cpu_threads_per_worker: int | None = Field(None, ge=1)
    """Torch threads per CPU train worker; none: the node's cores / workers on the node. Ray sets OMP_NUM_THREADS to
    the logical CPU reservation (1 here), which would idle half a 2-core box."""
    prefetch_batches: int = Field(8, ge=0)
    """Batches each worker keeps ready in a background thread, across epoch boundaries (where Ray Data restarts its
    stream); 0 turns the thread off."""
    shuffle_buffer: int = Field(512, ge=0)
    """Rows mixed in each worker's local shuffle buffer (Ray Data `iter_torch_batches`); 0: off."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints: a local path or `s3://`, `gs://` (one every node reaches once a run spans
    nodes); none: `<out>/ray`."""
    cluster_cpus: float | None = Field(None, gt=0)
    """CPUs the run plans its train workers and side actors within; none: the whole Ray cluster's. A sweep sets each
    trial's share, so concurrent trials do not oversubscribe."""
    resource_wait_s: float = Field(600.0, ge=0)
    """When a run asks Ray for more than its cluster holds, a cluster this process started fails at once; one joined
    by address may autoscale, so the request is asked of the autoscaler and waited for this long (announced, with
    what is pending) before the run fails."""

    @field_validator("shard_teacher")
    @classmethod
    def _shard_teacher_needs_zero3(cls, shard: bool, info: Any) -> bool:
        stage = info.data.get("zero_stage")  # absent when zero_stage itself failed (reported already)
        if shard and stage not in (None, 3):
            raise ValueError(f"sharding the teacher needs scale.zero_stage 3 (got {stage}): only ZeRO-3 partitions "
                             "parameters; set scale.zero_stage=3 or scale.shard_teacher=false")
        return shard


class ExportConfig(_Section):
    """The exported student (DIR/student): always fp32 safetensors weights a stock diffusers loads."""

    ema: float | None = None
    """The generator EMA exported as the student, `<out>/student` (one of `train.ema_decays`); none: the raw
    weights. The other weights go to `<out>/alternates/<name>/student` and are evaluated beside it."""

    choose: Literal["fixed", "held_out"] = "fixed"
    """Which weights are exported: `fixed`, those of `export.ema`; `held_out` (unet2d), whichever of them, the raw
    weights and the other EMAs has the lowest FID against the held-out images, on `export.choose_samples` samples
    drawn with noise of their own (not the final evaluation's); the others stay under `<out>/alternates/`."""

    choose_samples: int = Field(1000, ge=8)
    """Samples per candidate when `export.choose` is `held_out`."""

    fp16_variant: bool = False
    """Also write fp16 weights beside the fp32 ones, loaded with `from_pretrained(..., variant="fp16")`."""


class EvalConfig(_Section):
    num_samples: int = Field(5000, ge=8)
    """Samples for FID, class accuracy and the quality figures. FID needs a covariance and the k-NN figures (k up to
    5) more images than neighbours: at least 8."""
    teacher_steps: int = Field(100, ge=1)
    """The teacher's deterministic many-step (DDIM) sampler steps for the comparison."""
    feature_extractor: Literal["classifier", "inception", "clip"] = "classifier"
    """FID features: `classifier`, a digit classifier dmdscale trains (unet2d; the text families read it as
    "Inception where its weights are on disk, else no FID"), `inception` (clean-fid's, from local weights only), or
    `clip`: `eval.clip_model`'s image embeddings (FD_CLIP, as clip-FID papers)."""
    inception_weights: str | None = None
    """clean-fid's TorchScript Inception file (`inception-2015-12-05.pt`); none: where clean-fid itself keeps it
    (`/tmp`). Never downloaded: a missing file is an error naming the path."""
    clip_model: str | None = None
    """A local transformers CLIPModel folder (with its processor and tokenizer) for the text families' CLIP score
    and `clip` FID features; a hub id only works when already cached (nothing downloads). None: no CLIP score."""
    classifier_steps: int = Field(1500, ge=1)
    """Training steps of the digit classifier (FID features, class accuracy)."""
    during_training: bool = True
    """Evaluate every checkpoint on separate Ray actors while training goes on (FID and a grid, logged to MLflow at
    the checkpoint's step); the final evaluation is always run."""
    num_actors: int = Field(1, ge=1)
    """Checkpoint evaluation actors."""
    actor_cpus: float = Field(0.25, gt=0)
    """CPUs per evaluation actor."""
    actor_gpus: float = Field(0.25, ge=0)
    """Fraction of a GPU per evaluation actor when `scale.use_gpu`."""
    max_queued: int = Field(2, ge=1)
    """Checkpoints waiting on each evaluation actor (each holds a full copy of the generator's weights in host
    memory: ~3.4 GB for SD1.5's UNet in fp32). A submit to a full queue drops the OLDEST waiting checkpoint (the
    newest weights say more; the drop is counted and logged as `eval_dropped_checkpoints`), so training never waits
    for an evaluation."""

    @model_validator(mode="after")
    def _clip_needs_a_model(self) -> "EvalConfig":
        if self.feature_extractor == "clip" and self.clip_model is None:
            raise ValueError("feature_extractor 'clip' needs eval.clip_model (a local CLIPModel folder)")
        return self


class SearchDimension(_Section):
    """One swept config key: a list of `values`, or a range `low`..`high` (log-uniform with
    `log`, whole numbers with `integer`)."""

    values: list[Any] | None = None
    """The values to try; give either `values` or `low` and `high`."""
    low: float | None = None
    """Lower end of a range (above 0 with `log`)."""
    high: float | None = None
    """Upper end of a range (above `low`)."""
    log: bool = False
    """Draw the range log-uniformly."""
    integer: bool = False
    """Draw whole numbers."""

    @model_validator(mode="after")
    def _check(self) -> "SearchDimension":
        ranged = self.low is not None or self.high is not None
        if (self.values is None) == (not ranged):
            raise ValueError("give either values: [...] or low and high")
        if self.values is not None and not self.values:
            raise ValueError("values must not be empty")
        if ranged:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a range needs low < high (got low={self.low}, high={self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


def _default_space() -> dict[str, SearchDimension]:
    # The knobs DMD2 users tune by hand, around the authors' values (GAN weights 3e-3 / 1e-2,
    # TTUR 5, lr 1e-4 to 5e-4 depending on the data set).
    return {
        "loss.gan_generator_weight": SearchDimension(low=1e-3, high=3e-2, log=True),
        "loss.gan_critic_weight": SearchDimension(low=3e-3, high=1e-1, log=True),
        "train.ttur_ratio": SearchDimension(values=[1, 3, 5, 10]),
        "train.lr": SearchDimension(low=1e-4, high=1e-3, log=True),
    }


class SweepConfig(_Section):
    """Ray Tune over dotted config keys (pipelines/sweep.py). `space` is set in the YAML file:
    its keys hold dots, so dotted command-line overrides cannot address them."""

    search: Literal["grid", "random", "bayesian"] = "random"
    """`grid`: every combination of `values` (ranges not allowed); `random`: sampled; `bayesian`: Optuna's TPE,
    which proposes each trial from the figures of the finished ones. random and bayesian try the file's own values
    first."""
    num_samples: int = Field(8, ge=1)
    """Trials (grid: repeats of the whole grid); digits.yaml's `--quick`: 3."""
    space: dict[str, SearchDimension] = Field(default_factory=_default_space)
    """The swept dotted config keys, each `{values: [...]}` or `{low, high, log, integer}` (`sweep.space.<key>`
    below); set in the YAML file, since its keys hold dots. The default: the knobs DMD2 users tune by hand, around
    the authors' values (GAN weights 3e-3 / 1e-2, TTUR 5, lr 1e-4 to 5e-4 depending on the data set). Every value is
    checked before any cluster work."""
    metric: str = "fid_student"
    """What ranks the trials: any number the family's runs put in metrics.json (checked before the sweep starts; a
    name no run reports is refused with the close ones); for early stopping, one the checkpoint evaluations report
    too, e.g. `swd_pixels_student` (min), `recall_pixels_student` (max)."""
    mode: Literal["min", "max"] = "min"
    """Whether `sweep.metric` is better low (`min`) or high (`max`)."""
    early_stopping: Literal["asha", "none"] = "asha"
    """`asha`: stop trials whose intermediate `sweep.metric` (each checkpoint's evaluation, reported to Tune as the
    evaluation actors finish it) trails the others' at the same training step; needs checkpoints evaluated during
    training (families with evaluation actors). `none`: no early stopping."""
    grace_period: int | None = Field(None, ge=1)
    """ASHA's first rung: training steps before a trial can be stopped; none: 2 checkpoints."""
    reduction_factor: int = Field(3, ge=2)
    """ASHA's cut at each rung."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at a time; none: as many whole trials (workers, Ray Data's CPUs, the evaluation actor) as fit the
    cluster's resources now. Set it on autoscaling clusters."""


class Config(_Section):
    name: str = "dmdscale"
    """MLflow experiment name."""
    cache_dir: str = "~/.cache/dmdscale"
    """Built data sets, trained teachers and FID classifiers, keyed by their config; the teacher's
    evaluation samples and figures and the regression loss's pairs, keyed by the teacher's weights
    and the settings that make them (a second run with the same teacher skips them)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher_training: TeacherTrainingConfig = Field(default_factory=TeacherTrainingConfig)
    toy2d: Toy2dConfig = Field(default_factory=Toy2dConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    regression: RegressionConfig = Field(default_factory=RegressionConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    quick: dict[str, Any] = Field(default_factory=dict)
    """Dotted overrides that `--quick` applies (a reduced configuration for smoke tests)."""

    @model_validator(mode="after")
    def _check_across_sections(self) -> "Config":
        """Checks that span sections; what depends on the family is checked by `families.resolve`."""
        if self.loss.divergence != "reverse_kl" and self.loss.gan_critic_weight == 0:
            raise ValueError(f"loss.divergence: {self.loss.divergence!r} weights the DM gradient by the discriminator's "
                             f"density ratio; train the discriminator (loss.gan_critic_weight > 0) or use 'reverse_kl'")
        workers, batch = self.scale.num_workers, self.train.batch_size
        if batch % workers:
            raise ValueError(f"train.batch_size: {batch} does not split evenly over scale.num_workers={workers} "
                             f"(each worker takes batch_size / num_workers); use a multiple of {workers}")
        if self.export.ema is not None and self.export.ema not in self.train.ema_decays:
            raise ValueError(f"export.ema: {self.export.ema} is not one of train.ema_decays {self.train.ema_decays}")
        if self.train.ema_power is not None and not self.train.ema_decays:
            raise ValueError("train.ema_power: it shapes the averages of train.ema_decays, which is empty; "
                             "give a decay (e.g. [0.999]) or leave ema_power unset")
        if self.train.ema_decays and self.scale.zero_stage == 3:
            raise ValueError("train.ema_decays: generator EMA needs whole weights on every rank; "
                             "use scale.zero_stage 0-2 or leave train.ema_decays empty")
        if self.generator.step_draw == "row" and self.rollout.mode == "actors":
            raise ValueError("generator.step_draw: 'row' simulates every step in each batch inline; rollout actors "
                             "serve one step per iteration; use rollout.mode=inline or step_draw=batch")
        if self.lora.enabled and self.rollout.mode == "actors":
            raise ValueError("rollout.mode: 'actors' publishes full UNet weights, not LoRA adapters; "
                             "use rollout.mode=inline with lora.enabled")
        return self

    def flat(self) -> dict[str, Any]:
        """The config of one run as {dotted.key: value}, e.g. for MLflow params (the sweep
        section describes a sweep, not a run)."""
        return _flatten(self.model_dump(exclude={"quick", "sweep"}))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=100' -> ('train.max_steps', 100); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.max_steps=100")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML (quote strings holding ': ' or '#')") from None


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"config key '{key}' is not a known key"
    if not key:  # a check across sections: its message names the keys itself
        return str(err["msg"]).removeprefix("Value error, ")
    return f"config key '{key}': {err['msg']} (got {err.get('input')!r})"


def build_config(
    raw: dict[str, Any] | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    quick: bool = False,
) -> Config:
    """Validate a raw config tree, applying `quick` then the dotted overrides."""
    tree: dict[str, Any] = dict(raw or {})
    if quick:
        for key, value in (tree.get("quick") or {}).items():
            _set_dotted(tree, key, value)
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    quick: bool = False,
) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file '{path}'{where}: not valid YAML ({problem})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return build_config(raw, overrides, quick)
