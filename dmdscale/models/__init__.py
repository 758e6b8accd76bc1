"""Score networks behind one interface, x0 = model(x_t, t, cond, guidance_scale) (base), the
critic and its discriminator heads (heads), and one adapter per kind of teacher network:
toy2d (MLP and the exact mixture denoiser), unet2d (class-conditional diffusers UNet2DModel),
sd (SD1.5/SDXL UNet2DConditionModel) with its prompt encoding (text_encoders)."""
from dmdscale.models.base import Critic, Denoiser

__all__ = ["Critic", "Denoiser"]
