"""Training and evaluation data: sources (Parquet, image folders, digits) read on the driver
and as Ray Data streams, the one image conversion (images), and VAE latents with text
embeddings computed on a Ray Data actor pool and cached (latents)."""
