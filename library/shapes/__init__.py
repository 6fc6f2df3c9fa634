"""The embedded 'shapes' world: a procedural dataset, a rule-based evaluator and a tiny-VAE trainer.

Everything here is deterministic for a seed and needs no download, so the demo and the learning tests
run offline on a CPU. ``world`` draws images, ``evaluate`` reads colour and shape back from pixels,
``vae_training`` trains the tiny SD1 ``AutoencoderKL`` on the world.
"""
