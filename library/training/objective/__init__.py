"""From a batch to a loss: latents, text conditioning, noise, timesteps, loss terms."""
