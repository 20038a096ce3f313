"""A short fingerprint of a model's weights, to key caches of what the model computed (reference log-probs)."""
from __future__ import annotations

import hashlib

import torch

SAMPLES_PER_TENSOR = 4096  # values hashed per parameter: enough to tell any two fine-tunes apart, cheap on a GPU


def weights_fingerprint(model, skip_trainable: bool = False) -> str:
    """blake2b over every parameter's name, shape, dtype and an evenly strided sample of its raw values.

    skip_trainable: leave out the parameters that train (a peft adapter's): the fingerprint of the frozen base
    that the reference forward (adapters off) runs on. A full sample of a 7B model would mean copying 14 GB off
    the GPU; strided values of every tensor change whenever the tensor is retrained or requantised.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if skip_trainable and p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].contiguous().cpu()
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()
