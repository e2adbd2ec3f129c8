"""Learned pruners (their networks and checkpoint formats) and the checkpoints that ship with trimformer."""
