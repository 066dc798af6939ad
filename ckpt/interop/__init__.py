"""Other layouts: Hugging Face export, Zarr v3 archives, adopting a directory of safetensors files."""
