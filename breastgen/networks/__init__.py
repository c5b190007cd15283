"""Networks MONAI lacks (text encoder, GAN generators ...); MONAI's own are used directly from configs."""

from . import text
