"""The operations on a root: attempts, save, commit, restore, verify, copy, retirement, garbage collection and retention."""
