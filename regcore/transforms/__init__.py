"""Transforms: maps from fixed world points to moving world points (mm)."""

from .init import center_of_mass, image_center, initialize_linear
from .linear import LINEAR_TRANSFORMS, Affine, LinearTransform, Rigid, Similarity, Translation, rotation_matrix

__all__ = [
    "LinearTransform",
    "Translation",
    "Rigid",
    "Similarity",
    "Affine",
    "LINEAR_TRANSFORMS",
    "rotation_matrix",
    "initialize_linear",
    "center_of_mass",
    "image_center",
]
