"""A diffusers `AutoencoderKL` from a local folder, encoding pixels to the latents the model trains on."""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

from engine.data.shards import DataError, read_json


def latent_meta(path: str | Path, image_size: int) -> dict:
    """What index.json records about the latents of this VAE (read from its config.json only).

    latent = (z - shift_factor) * scaling_factor, both from the config (SD VAEs: 0.18215, no shift);
    options missing from an older config take AutoencoderKL's defaults, as diffusers does.
    """
    from diffusers import AutoencoderKL

    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise DataError(f"VAE folder {path}: no config.json (expected a diffusers AutoencoderKL saved with save_pretrained)")
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKL.__init__).parameters.items()}
    config = {**defaults, **read_json(config_path)}
    downsample = 2 ** (len(config["block_out_channels"]) - 1)
    if image_size % downsample:
        raise DataError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {downsample}")
    return {"vae": str(Path(path).resolve()), "scaling_factor": float(config["scaling_factor"]),
            "shift_factor": float(config["shift_factor"] or 0.0), "channels": int(config["latent_channels"]),
            "downsample": downsample, "size": image_size // downsample, "dtype": "float16", "flip_pairs": True}


class LatentEncoder:
    """Encodes to scaled latents (z is the posterior mean, or mean + std * noise when noise is given)
    and decodes them back to pixels."""

    def __init__(self, path: str | Path, image_size: int, device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKL

        self.meta = latent_meta(path, image_size)
        self.device = torch.device(device)
        low_memory = importlib.util.find_spec("accelerate") is not None  # diffusers warns without it
        self.vae = AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=low_memory)
        self.vae = self.vae.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f] float32 on the CPU."""
        posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        z = posterior.mean if noise is None else posterior.mean + posterior.std * noise.to(self.device)
        return ((z - self.meta["shift_factor"]) * self.meta["scaling_factor"]).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels [B, 3, H, W] in [-1, 1], float32 on this encoder's device."""
        z = latents.to(self.device, torch.float32) / self.meta["scaling_factor"] + self.meta["shift_factor"]
        return self.vae.decode(z).sample.float().clamp(-1, 1)
