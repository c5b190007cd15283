"""Image-quality and fidelity metrics."""

from . import text2image
from .fid import InceptionFeatures, fid, frechet_distance, inception_path, kernel_inception_distance
