"""File formats and prompt text encoding, below training, sampling and networks (docs/architecture.md):
kohya LoRA files, safetensors headers, ``ss_*`` metadata, modelspec, model hashes, Textual Inversion
embedding files, long-prompt tokenization and ``(word:1.2)`` weighting. Imports only errors, fileio, config."""
