"""The fixed 2-D sin-cos position embedding of MAE and DiT, shared by the diffusion transformers
and the pixel decoder."""
from __future__ import annotations

import torch


def sincos_pos_embed_2d(width: int, grid_size: int) -> torch.Tensor:
    """[grid_size**2, width], tokens in row-major order (token index = row * grid + col).

    Half of the channels encode the column, the other half the row (MAE's convention: the column
    comes first), each as [sin, cos] of the position times 1 / 10000^(k/K). Computed in float64
    like the reference, then cast to float32.
    """
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for the 2-D sin-cos position embedding")
    k = width // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()
