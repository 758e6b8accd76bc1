"""One adapter per kind of teacher network behind the `core.networks.Denoiser` interface:
toy2d (MLP and the exact mixture denoiser), unet2d (class-conditional diffusers UNet2DModel),
sd (SD1.5/SDXL UNet2DConditionModel), flow (SD3/FLUX transformers), their prompt encoding
(text_encoders), the critic's discriminator heads (heads) and where a teacher comes from (hub)."""
