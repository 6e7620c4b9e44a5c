"""VAE decoding and encoding in bounded memory: tiles and slices, as diffusers' AutoencoderKL does them
(`enable_tiling()`, `enable_slicing()`), so the images are the ones diffusers makes with those switched on.

Tiling (`Request.vae_tiling`): the input is cut into overlapping square tiles, each tile runs through the
network on its own, and neighbouring outputs are blended linearly across the overlap (each tile with the
already blended tile above it, then the one to its left), then cropped and concatenated. The sizes come from
the VAE config exactly as diffusers derives them:

    sample tile  = sample_size                                    (pixels; 512 for SD 1.5, 64 for `tiny`)
    latent tile  = int(sample_size / 2 ** (len(block_out_channels) - 1))
    overlap      = 0.25: tiles start every int(tile_in * 0.75) input cells, blend int(tile_out * 0.25)
                   output cells, and keep tile_out - blend of each

A decode tiles when the latents are larger than a latent tile on either side; an encode when the image is
larger than a sample tile. Each network call then needs the memory of one tile; the tiles' outputs
and the joined result (the size of the output) are held whole.

The encoder here returns the posterior's mean and std; diffusers tiles the encoder's moments (mean and
log-variance) before it samples, so the tiles are blended as mean and log-variance (2 log std) and std is
taken again afterwards: exp(0.5 clamp(logvar, -30, 20)), diffusers' DiagonalGaussianDistribution.

Slicing (`Request.vae_slicing`): one image per network call, concatenated (diffusers slices only batches of
more than one); with tiling too, each image is tiled on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

# One call of the component on a backend, returning its outputs by name (the ONNX contract):
Decoder = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]  # latent [B,L,h,w] -> {"images": [B,3,8h,8w]}
Encoder = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]  # images [B,3,H,W] -> {"latent_mean", "latent_std"}
Network = Callable[[torch.Tensor], torch.Tensor]

OVERLAP = 0.25  # diffusers' tile_overlap_factor (not a config field there either)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps log-variance to this


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sides of one VAE, in pixels (`sample`) and latents (`latent`), and the overlap factor."""

    sample: int
    latent: int
    overlap: float = OVERLAP

    @classmethod
    def from_config(cls, vae: Mapping[str, Any]) -> "Tiles":
        """diffusers' AutoencoderKL.__init__: sample_size (default 32; the first entry of a list) and the
        number of down blocks (each but the last halves the side)."""
        size = vae.get("sample_size", 32)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        blocks = len(vae.get("block_out_channels", (64,)))
        return cls(size, int(size / 2 ** (blocks - 1)))

    def count(self, height: int, width: int, tile: int) -> int:
        """Network calls per image for an input of height x width cut into `tile`-sided tiles."""
        if height <= tile and width <= tile:
            return 1
        stride = int(tile * (1 - self.overlap))
        return len(range(0, height, stride)) * len(range(0, width, stride))


def decode(decoder: Decoder, latents: torch.Tensor, tiles: Tiles | None = None, slicing: bool = False) -> torch.Tensor:
    """Images from unscaled latents: whole, in tiles (`tiles` given) and/or one image at a time (`slicing`)."""
    if slicing and latents.shape[0] > 1:
        return torch.cat([decode(decoder, z, tiles) for z in latents.split(1)])
    network: Network = lambda z: decoder(z)["images"]  # noqa: E731
    if tiles is None or max(latents.shape[-2:]) <= tiles.latent:
        return network(latents)
    return _tiled(network, latents, tiles.latent, tiles.sample, tiles.overlap)


def encode(encoder: Encoder, images: torch.Tensor, tiles: Tiles | None = None, slicing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's (mean, std) of images in [-1, 1]: whole, in tiles and/or one image at a time."""
    if slicing and images.shape[0] > 1:
        parts = [encode(encoder, x, tiles) for x in images.split(1)]
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
    if tiles is None or max(images.shape[-2:]) <= tiles.sample:
        out = encoder(images)
        return out["latent_mean"], out["latent_std"]

    def moments(x: torch.Tensor) -> torch.Tensor:  # [mean; logvar] along channels, as diffusers' encoder outputs them
        out = encoder(x)
        return torch.cat([out["latent_mean"].float(), 2 * torch.log(out["latent_std"].float())], dim=1)

    blended = _tiled(moments, images, tiles.sample, tiles.latent, tiles.overlap)
    mean, logvar = blended.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))


def _tiled(network: Network, x: torch.Tensor, tile_in: int, tile_out: int, overlap: float) -> torch.Tensor:
    """diffusers' tiled_decode / _tiled_encode: run `network` on overlapping tiles of `x` (side tile_in, every
    int(tile_in * (1 - overlap)) cells), blend each output tile with the (already blended) tiles above and to
    its left over int(tile_out * overlap) cells, keep its first tile_out - blend rows and columns, and join."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[network(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                blend_down(rows[i - 1][j], tile, extent)
            if j > 0:
                blend_right(row[j - 1], tile, extent)
            kept.append(tile[:, :, :keep, :keep])
        out_rows.append(torch.cat(kept, dim=3))
    return torch.cat(out_rows, dim=2)


def _ramp(n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (1 - k/n, k/n) for k = 0..n-1, computed in double as diffusers' Python floats are."""
    k = [y / n for y in range(n)]
    return (torch.tensor([1 - w for w in k], dtype=torch.float64).to(like.dtype).to(like.device),
            torch.tensor(k, dtype=torch.float64).to(like.dtype).to(like.device))


def blend_down(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: tile's first rows fade in from the last `extent` rows of the tile above (diffusers' blend_v)."""
    n = min(above.shape[2], tile.shape[2], extent)
    if n > 0:
        a, b = _ramp(n, tile)
        tile[:, :, :n, :] = above[:, :, above.shape[2] - n :, :] * a.view(n, 1) + tile[:, :, :n, :] * b.view(n, 1)


def blend_right(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: tile's first columns fade in from the last `extent` columns of the tile to its left (blend_h)."""
    n = min(left.shape[3], tile.shape[3], extent)
    if n > 0:
        a, b = _ramp(n, tile)
        tile[:, :, :, :n] = left[:, :, :, left.shape[3] - n :] * a + tile[:, :, :, :n] * b
