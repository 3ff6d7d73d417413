"""Model families: what is computed. Each family is a frozen dataclass of hyperparameters."""

from dmix.families.base import Family, tree_add
from dmix.families.covariance import COVARIANCE_TYPES, get_covariance
from dmix.families.deep import DeepGaussian, GaussianNetwork
from dmix.families.gaussian import Gaussian
from dmix.families.skew_normal import SkewNormal

__all__ = [
    "COVARIANCE_TYPES",
    "DeepGaussian",
    "Family",
    "Gaussian",
    "GaussianNetwork",
    "SkewNormal",
    "get_covariance",
    "tree_add",
]
