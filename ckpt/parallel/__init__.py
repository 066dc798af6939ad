"""Transports for many writers: torchrun / torch.distributed (gloo) and Ray."""
