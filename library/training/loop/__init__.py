"""The one training loop and its state: checkpoints and resume, output names, throughput, the non-finite guard."""
