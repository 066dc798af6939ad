"""The on-storage format: the path grammar, the manifest (model, seal, parser), safetensors headers, strict JSON, dtypes and CRC32C. Pure (no I/O)."""
