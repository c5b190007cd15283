"""Readers, transforms, datalists and demo phantoms."""

from . import datalists, histology, phantoms, readers, transforms
