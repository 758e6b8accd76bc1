"""Teacher/score adapters: one interface, x0 = model(x_t, t, cond, guidance_scale)."""
from dmdscale.models.base import Critic, Denoiser

__all__ = ["Critic", "Denoiser"]
