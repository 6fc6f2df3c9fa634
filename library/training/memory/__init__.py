"""Device memory: fp8 weight storage, frozen models off the accelerator once cached."""
