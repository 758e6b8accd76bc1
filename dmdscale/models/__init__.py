"""What the families' networks share, below them: prompt encoding as the diffusers pipelines do
it (text_encoders), what differs between SD and flow-matching teachers as data (variants), the
critic's discriminator heads (heads) and where a teacher comes from (hub). Each family's own
adapter behind `core.networks.Denoiser` is in its folder (`dmdscale/families/<name>/model.py`)."""
