"""Lighting for the procedural renderer: second-order spherical harmonics (SH), RGB.

A light is ``(B, LIGHT_DIM)`` = 3 colour channels x 9 SH radiance coefficients, flattened
channel-major (``light.view(B, 3, 9)``), expressed in the *camera/world frame* (x right, y up,
z towards the camera), so the same light on two poses of a head lights it from the same side of
the image. Diffuse shading uses Ramamoorthi & Hanrahan's irradiance formula; the specular
highlight and the cast shadow use the "dominant direction" read off the first-order band.
Coefficients of band 0 only = pure ambient light, which shades every pose identically.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LIGHT_DIM = 27
_A = (math.pi, 2 * math.pi / 3, 2 * math.pi / 3, 2 * math.pi / 3,
      math.pi / 4, math.pi / 4, math.pi / 4, math.pi / 4, math.pi / 4)
Y00 = 0.282095


def sh_basis(n: Tensor) -> Tensor:
    """Real SH basis up to l=2 at unit directions n (..., 3) -> (..., 9)."""
    x, y, z = n.unbind(-1)
    return torch.stack([
        torch.full_like(x, Y00), 0.488603 * y, 0.488603 * z, 0.488603 * x,
        1.092548 * x * y, 1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z,
        0.546274 * (x * x - y * y)], -1)


def irradiance(light: Tensor, n: Tensor) -> Tensor:
    """Irradiance / pi (so albedo * result = diffuse radiance) at normals n (N, 3); light (N, 27)."""
    a = torch.tensor(_A, dtype=n.dtype, device=n.device) / math.pi
    coeff = light.view(-1, 3, 9) * a
    return torch.einsum("nck,nk->nc", coeff, sh_basis(n)).clamp_min(0)


def ambient(light: Tensor) -> Tensor:
    """The band-0 part of ``irradiance`` (N, 3): what a fully shadowed point still receives."""
    return (light.view(-1, 3, 9)[:, :, 0] * Y00).clamp_min(0)


def dominant(light: Tensor) -> tuple[Tensor, Tensor]:
    """Direction (N, 3) and strength (N,) of the light's first-order band (luminance)."""
    band1 = light.view(-1, 3, 9)[:, :, 1:4].mean(1)  # (y, z, x) order of the basis
    v = torch.stack([band1[:, 2], band1[:, 0], band1[:, 1]], -1)
    strength = v.norm(dim=-1) / 0.488603
    return torch.nn.functional.normalize(v, dim=-1, eps=1e-8), strength


def directional(direction: Tensor, colour: Tensor) -> Tensor:
    """SH coefficients (3, 9) of a distant light of radiance ``colour`` from unit ``direction``."""
    return colour[:, None] * sh_basis(direction)[None, :]


def sample_light(gen: torch.Generator) -> Tensor:
    """A plausible portrait light (27,): a key light from the front hemisphere, a dimmer fill
    from the other side, and a tinted ambient term. Intensities are in linear radiance units."""
    u = torch.rand(12, generator=gen)
    az = math.radians(-75 + 150 * u[0].item())
    el = math.radians(-10 + 65 * u[1].item())
    key_d = torch.tensor([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)])
    warm = u[2].item()
    key_c = torch.tensor([1.0 + 0.12 * warm, 0.97, 0.9 + 0.12 * (1 - warm) - 0.08 * warm])
    key = directional(key_d, key_c * (1.2 + 1.4 * u[3].item()))
    fill_d = torch.tensor([-math.sin(az) * 0.8, 0.1, 0.6])
    fill_d = fill_d / fill_d.norm()
    fill = directional(fill_d, torch.ones(3) * 0.5 * u[4].item())
    amb_c = torch.tensor([0.9 + 0.2 * u[5].item(), 0.95 + 0.1 * u[6].item(), 0.9 + 0.25 * u[7].item()])
    amb = (0.25 + 0.45 * u[8].item()) * amb_c
    sh = key + fill
    sh[:, 0] = sh[:, 0] + amb * 2 * math.sqrt(math.pi)  # uniform radiance -> L00
    return sh.reshape(LIGHT_DIM)

