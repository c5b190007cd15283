"""Loss functions not provided by MONAI."""

from .pyramid import PyramidL1Loss, gaussian_pyramid
