"""Diffusion maths as pure functions: the denoising loss (loss.py) and the sampler (sampling.py).

No parameters and no Lightning here (edm2's ``EDM2Loss`` / ``edm_sampler``, k-diffusion's
samplers): a task supplies its model as a function and calls these.
"""

from icp.diffusion.loss import (PREDICTION_TYPES, Noised, denoising_loss, noise_latents, prediction_target,
                                sample_timesteps)
from icp.diffusion.sampling import Denoiser, classifier_free_guidance, guide, initial_noise, sample

__all__ = ["PREDICTION_TYPES", "Noised", "denoising_loss", "noise_latents", "prediction_target",
           "sample_timesteps", "Denoiser", "classifier_free_guidance", "guide", "initial_noise", "sample"]
