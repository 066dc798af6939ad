"""The user's state: flattening trees of tensors and plain values, ``Shard`` and DTensor leaves, host staging for async saves."""
