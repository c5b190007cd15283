"""Linking mammograms and breast histology: label-matched pairs, an embedding index with exact KNN search,
translation and embedding-conditioned latent diffusion (the ``mammo2histo_link`` bundle).

* :mod:`.pairs` -- BCDR / BreaKHis / datalist inputs, label-matched patient-disjoint pairs;
* :mod:`.index` -- :class:`EmbeddingIndex` (on disk, model fingerprint, cosine / manhattan / euclidean KNN);
* :mod:`.transforms` -- input checks, lesion crops, cached mammogram embeddings;
* :mod:`.engine` -- training glue, the diffusion pipeline, inference (:class:`Linker`) and evaluation.

The networks are in :mod:`breastgen.networks.linking`.
"""

from . import engine, index, pairs, transforms
from .index import METRICS, EmbeddingIndex, model_fingerprint
from .pairs import LABELS
