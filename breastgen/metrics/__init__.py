"""Image-quality and fidelity metrics."""

from .fid import InceptionFeatures, fid, frechet_distance, inception_path, kernel_inception_distance
