"""Beyond sd-scripts: validation loss, EMA, run receipts, Hugging Face Hub upload."""
