"""Image captioning with transformers models (BLIP, GIT): spec utilities §1 and sd-scripts' GIT script."""
