"""toy2d: distil the exact denoiser of a 2-D Gaussian mixture into a 1-4 step MLP generator.

The analytic harness: the teacher is a formula, so the student's distribution is checked
against the truth (energy distance, share of samples within 3 std of a mode, per-mode shares).
It runs in one plain process, without Ray or DeepSpeed.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dmdscale.config import Config
from dmdscale.core import seeds
from dmdscale.core.loop import LoopResult, train_loop
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.sampling import sample, teacher_sample
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.step import Batch, DMD2Step, RegressionPairs
from dmdscale.contracts import Evaluation, Trained
from dmdscale.families.base import FamilyBase
from dmdscale.core.networks import Denoiser
from dmdscale.models.heads import MLPHead
from dmdscale.families.toy2d.model import GaussianMixture2D, MixtureDenoiser, MLPDenoiser


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X-Y| - E|X-X'| - E|Y-Y'| (Szekely); zero iff the distributions match."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sample_metrics(points: torch.Tensor, mixture: GaussianMixture2D, reference: torch.Tensor,
                   prefix: str) -> dict[str, float]:
    shares = mixture.mode_shares(points)
    return {
        f"energy_distance_{prefix}": energy_distance(points, reference),
        f"in_mode_fraction_{prefix}": float(shares.sum()),  # within 3 std of some mode
        f"mode_share_min_{prefix}": float(shares.min()),
        f"mode_share_max_{prefix}": float(shares.max()),
    }


def fit_to_teacher(net: Denoiser, teacher: Denoiser, mixture: GaussianMixture2D, steps: int,
                   batch_size: int = 512, lr: float = 1e-3, seed: int = 0) -> None:
    """Regress `net` onto the exact denoiser: E[x0 | x_t] is known, so the targets carry no
    sampling noise. Gives the toy a pretrained network to initialise generator and critic."""
    if steps == 0:
        return
    schedule = teacher.schedule
    rng = torch.Generator().manual_seed(seeds.toy_teacher_fit(seed))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="fit toy teacher net", mininterval=1.0, leave=False):
        t = torch.randint(schedule.num_train_timesteps, (batch_size,), generator=rng)
        x0 = mixture.sample(batch_size, rng)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=rng), t)
        with torch.no_grad():
            x0_exact = teacher(x_t, t)
            eps_exact = (x_t - schedule.add_noise(x0_exact, torch.zeros_like(x0), t)) / \
                schedule.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t)
            target = schedule.target(x0_exact, eps_exact, t, net.prediction_type)
        loss = torch.nn.functional.mse_loss(net.predict(x_t, t), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()


class Toy2D:
    """The analytic harness's parts, built from the config."""

    def __init__(self, cfg: Config, device: str = "cpu"):
        tc = cfg.toy2d
        self.cfg = cfg
        self.mixture = GaussianMixture2D(tc.num_modes, tc.mode_std, tc.radius)
        self.schedule = NoiseSchedule.ddpm(tc.beta_schedule)
        self.teacher = MixtureDenoiser(self.mixture, self.schedule).to(device)

        torch.manual_seed(cfg.train.seed)
        teacher_net = MLPDenoiser(self.schedule, 2, tc.hidden_dim, tc.num_layers).to(device)
        fit_to_teacher(teacher_net, self.teacher, self.mixture, tc.init_steps, seed=cfg.train.seed)
        self.generator = copy.deepcopy(teacher_net)
        self.critic = Toy2dFamily().critic(cfg, copy.deepcopy(teacher_net)).to(device)
        self.device = device

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        rng = torch.Generator().manual_seed(seed)
        while True:
            yield Batch(self.mixture.sample(batch_size, rng).to(self.device))

    def step_fn(self) -> DMD2Step:
        cfg = self.cfg
        pairs = Toy2dFamily().regression_pairs(cfg, self.teacher, self.device)
        return DMD2Step(cfg, self.teacher, TorchOptimizedModule(self.generator, cfg.train, role="generator"),
                        TorchOptimizedModule(self.critic, cfg.train, role="critic"), regression_pairs=pairs,
                        device=self.device)

    @torch.no_grad()
    def evaluate(self, seed: int = 1234) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        cfg, n = self.cfg, max(self.cfg.eval.num_samples, 1)
        rng = torch.Generator().manual_seed(seed)
        data = self.mixture.sample(n, rng)
        reference = self.mixture.sample(n, rng)  # a second draw: the metric's noise floor
        noise = torch.randn(n, 2, generator=rng)
        self.generator.eval()
        t0 = time.perf_counter()
        student = sample(self.generator, self.schedule, noise, cfg.generator.timesteps, rng=rng)
        student_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        teacher = teacher_sample(self.teacher, noise, cfg.eval.teacher_steps)
        teacher_s = time.perf_counter() - t0
        self.generator.train()
        metrics = {
            "student_steps": len(cfg.generator.timesteps),
            "teacher_steps": cfg.eval.teacher_steps,
            "num_samples": n,
            "energy_distance_data": energy_distance(reference, data),
            **sample_metrics(student, self.mixture, data, "student"),
            **sample_metrics(teacher, self.mixture, data, "teacher"),
            "sampling_speedup": teacher_s / max(student_s, 1e-9),
        }
        return metrics, {"student": student, "teacher": teacher, "data": data}


def plot_samples(points: dict[str, torch.Tensor], mixture: GaussianMixture2D, path: Path,
                 title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), sharex=True, sharey=True)
    for ax, (name, pts) in zip(axes, points.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.35, color={"data": "tab:gray"}.get(name, "tab:blue"))
        ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker="x", color="tab:red", s=30)
        ax.set_title(name)
        ax.set_aspect("equal")
    lim = float(mixture.means.abs().max()) + 1.0
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg: Config, progress: bool = True, on_log=None) -> tuple[Toy2D, LoopResult]:
    toy = Toy2D(cfg)
    result = train_loop(toy.step_fn(), toy.batches(cfg.train.batch_size, cfg.train.seed),
                        cfg.train.max_steps, max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                        log_every=cfg.train.log_every, on_log=on_log, progress=progress)
    return toy, result


class Toy2dFamily(FamilyBase):
    """The analytic harness: trains in this process (no Ray), in seconds."""

    name = run_label = "toy2d"
    trains_on_ray = False
    supports_regression_loss = True

    def check_config(self, cfg: Config) -> None:
        if cfg.model.teacher != "analytic":
            raise ValueError(f"model.teacher: the toy2d teacher is the exact mixture denoiser, 'analytic' "
                             f"(got {cfg.model.teacher!r})")
        if cfg.train.init is not None or cfg.train.ema_decays:
            raise ValueError("train.init / train.ema_decays: staged runs and EMA are for the families trained on Ray "
                             "(toy2d trains in one process)")
        if cfg.loss.gan_augment or cfg.loss.gan_head != "conv" or cfg.loss.gan_feature_depths:
            raise ValueError("loss.gan_augment / loss.gan_head / loss.gan_feature_depths: image and transformer "
                             "options; toy2d's points go to an MLP head (leave gan_augment and gan_feature_depths "
                             "empty and gan_head 'conv')")

    def preflight(self, cfg: Config) -> None:
        return None  # nothing outside this process to check

    def critic_head(self, cfg: Config, fake_score: Denoiser) -> torch.nn.Module:
        return MLPHead(cfg.toy2d.hidden_dim)

    def regression_pairs(self, cfg: Config, teacher: Denoiser, device: Any) -> RegressionPairs | None:
        return RegressionPairs.for_config(cfg, teacher, (2,), device=device)

    def fit(self, cfg: Config, inputs: None, out: Path, tracker: Any, *, fail_at_step: int | None = None,
            on_evaluation: Any = None, timeline: Any = None) -> Trained:
        t0 = time.perf_counter()
        toy, result = train(cfg, on_log=tracker.log_metrics)
        history = result.history
        metrics = {"train_seconds": time.perf_counter() - t0, "steps_completed": len(history),
                   "nonfinite_steps": result.nonfinite_steps}
        return Trained(toy, metrics, [{**m, "step": i} for i, m in enumerate(history)])

    def write_model_card(self, cfg: Config, inputs: None, trained: Trained, metrics: dict[str, Any]) -> None:
        pass  # the toy student is not exported

    def evaluate(self, cfg: Config, inputs: None, trained: Trained, workdir: Path) -> Evaluation:
        metrics, points = trained.student.evaluate()
        return Evaluation(metrics, {name: points[key].numpy().astype(np.float32)
                                    for name, key in (("points", "student"), ("teacher_points", "teacher"),
                                                      ("data_points", "data"))})

    def draw_samples(self, cfg: Config, samples: dict[str, np.ndarray], metrics: dict[str, Any],
                     path: Path) -> None:
        toy = cfg.toy2d
        points = {"student": samples["points"], "teacher": samples["teacher_points"], "data": samples["data_points"]}
        plot_samples(points, GaussianMixture2D(toy.num_modes, toy.mode_std, toy.radius), path,
                     f"toy2d: {metrics['student_steps']}-step student vs "
                     f"{metrics['teacher_steps']}-step teacher (energy distance "
                     f"{metrics['energy_distance_student']:.4f} vs {metrics['energy_distance_teacher']:.4f})")
