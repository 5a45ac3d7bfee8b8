"""Torch side of a step: batch tensors, model forward, sampling."""
