"""One interface over the video autoencoders the presets use.

The real presets use the HunyuanVideo causal 3D VAE (temporal x4, spatial x8). A miniature preset may use a
per-frame `AutoencoderTiny` (no temporal compression) instead: the engine never hard-codes ratios, it reads
them from the autoencoder's config through `latent_geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLHunyuanVideo, AutoencoderTiny


@dataclass(frozen=True)
class LatentGeometry:
    channels: int
    temporal_ratio: int
    spatial_ratio: int
    scaling_factor: float
    shift_factor: float = 0.0

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_ratio + 1

    def pixel_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal_ratio + 1

    def valid_num_frames(self, num_frames: int) -> bool:
        return num_frames >= 1 and (num_frames - 1) % self.temporal_ratio == 0


def latent_geometry(vae) -> LatentGeometry:
    cfg = vae.config
    if isinstance(vae, AutoencoderKLHunyuanVideo):
        return LatentGeometry(cfg.latent_channels, cfg.temporal_compression_ratio, cfg.spatial_compression_ratio,
                              float(cfg.scaling_factor))
    if isinstance(vae, AutoencoderTiny):
        spatial = cfg.upsampling_scaling_factor ** (len(cfg.encoder_block_out_channels) - 1)
        return LatentGeometry(cfg.latent_channels, 1, spatial, float(cfg.scaling_factor), float(cfg.shift_factor))
    raise TypeError(f"unsupported autoencoder class {type(vae).__name__}")


def encode_raw(vae, video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> unscaled latents [B, C, t, h, w] (distribution mode: deterministic).
    A per-frame autoencoder sees the frames folded into the batch."""
    if isinstance(vae, AutoencoderTiny):
        b, c, t, h, w = video.shape
        lat = vae.encode(video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)).latents
        return lat.reshape(b, t, *lat.shape[1:]).permute(0, 2, 1, 3, 4)
    return vae.encode(video).latent_dist.mode()


def decode_raw(vae, latents: torch.Tensor) -> torch.Tensor:
    """Unscaled latents [B, C, t, h, w] -> video [B, 3, T, H, W] (not clamped)."""
    if isinstance(vae, AutoencoderTiny):
        b, c, t, h, w = latents.shape
        frames = vae.decode(latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)).sample
        return frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
    return vae.decode(latents).sample


def encode_video(vae, video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> scaled latents [B, C, t, h, w], fp32."""
    geom = latent_geometry(vae)
    lat = encode_raw(vae, video.to(device=vae.device, dtype=vae.dtype))
    return ((lat - geom.shift_factor) * geom.scaling_factor).to(torch.float32)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, t, h, w] -> video [B, 3, T, H, W] clamped to [-1, 1], fp32."""
    geom = latent_geometry(vae)
    lat = (latents / geom.scaling_factor + geom.shift_factor).to(device=vae.device, dtype=vae.dtype)
    return decode_raw(vae, lat).to(torch.float32).clamp(-1.0, 1.0)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 (CPU)."""
    return ((video.permute(1, 2, 3, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def uint8_to_video(frames: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [3, T, H, W] in [-1, 1] fp32."""
    return frames.to(torch.float32).permute(3, 0, 1, 2) / 127.5 - 1.0
