"""dmix: mixture models fitted out of core.

Dask streams row blocks of (Zarr) data through per-block E-steps on the workers; the partial
sufficient statistics are tree-reduced and the M-step runs on the driver.
"""

from dmix.deep_mixture import DeepGaussianMixture, GaussianMixtureNetwork
from dmix.errors import (
    CheckpointMismatchError,
    CheckpointWarning,
    CollapseWarning,
    ConvergenceWarning,
    DataError,
    DmixError,
    IllConditionedError,
    InvalidParameterError,
    NotFittedError,
)
from dmix.estimators import GaussianMixture, resume
from dmix.families.covariance import COVARIANCE_TYPES
from dmix.families.gaussian import Gaussian
from dmix.io.model import load_model as load
from dmix.selection import Selection, select
from dmix.skew_normal_mixture import SkewNormalMixture
from dmix.squared_mixture import SquaredGaussianMixture

__version__ = "0.1.0"

__all__ = [
    "COVARIANCE_TYPES",
    "CheckpointMismatchError",
    "CheckpointWarning",
    "CollapseWarning",
    "ConvergenceWarning",
    "DataError",
    "DeepGaussianMixture",
    "DmixError",
    "Gaussian",
    "GaussianMixture",
    "GaussianMixtureNetwork",
    "IllConditionedError",
    "InvalidParameterError",
    "NotFittedError",
    "Selection",
    "SkewNormalMixture",
    "SquaredGaussianMixture",
    "__version__",
    "load",
    "resume",
    "select",
]
