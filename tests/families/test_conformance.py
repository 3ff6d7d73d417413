"""The family conformance suite (:class:`dmix.testing.FamilyTests`) for every family.

The Gaussian family runs it once per covariance structure. Its ``params`` are deliberately
away from the fitted ones (perturbed means, inflated covariances, uneven weights), so the
monotonicity test sees EM climb.
"""

import numpy as np
import pytest

from dmix.families.covariance import COVARIANCE_TYPES
from dmix.families.gaussian import Gaussian
from dmix.testing import FamilyTests, structured_covariances


class TestGaussianConformance(FamilyTests):
    """Gaussian mixtures, K = 3 in D = 3, 240 rows from three correlated clusters."""

    @pytest.fixture(params=list(COVARIANCE_TYPES))
    def family(self, request):
        return Gaussian(covariance_type=request.param, reg_covar=1e-6)

    @pytest.fixture
    def data(self):
        rng = np.random.default_rng(20240611)
        centers = np.array([[0.0, 0.0, 0.0], [4.0, 1.0, -2.0], [-3.0, 3.0, 1.0]])
        mix = rng.normal(size=(3, 3, 3)) * 0.4 + np.eye(3)
        labels = rng.integers(0, 3, size=240)
        x = centers[labels] + np.einsum("nij,nj->ni", mix[labels], rng.normal(size=(240, 3)))
        return x + np.array([5.0, -2.0, 0.5])  # not centred at the origin

    @pytest.fixture
    def params(self, family, data):
        rng = np.random.default_rng(7)
        means = data[[0, 80, 160]] + rng.normal(scale=0.5, size=(3, 3))
        dense = np.stack([np.cov(data.T) * s for s in (0.5, 0.8, 1.2)])
        covariances = structured_covariances(dense, family.covariance_type)
        return family.make_params([0.2, 0.3, 0.5], means, covariances)


def _variant(name: str) -> Gaussian:
    """Gaussian families with the options of issue 6, for the conformance suite."""
    from dmix.families.priors import resolve_prior

    cov_type, option = name.split(":")
    if option == "map":
        prior = resolve_prior(cov_type, 3, 3, weight_concentration_prior=2.0,
                              mean_precision_prior=0.1, degrees_of_freedom_prior=6.0,
                              data_mean=np.array([5.0, -2.0, 0.5]), data_covariance=np.eye(3))
        return Gaussian(covariance_type=cov_type, prior=prior)
    if option == "cem":
        return Gaussian(covariance_type=cov_type, cem=True)
    return Gaussian(covariance_type=cov_type, var_regularization=1e-3)


class TestGaussianVariantsConformance(TestGaussianConformance):
    """MAP (Dirichlet + Normal-inverse-Wishart), classification EM and variance
    regularisation pass the same properties (EM increases the log-posterior under MAP and the
    classification log-likelihood under CEM)."""

    @pytest.fixture(params=[f"{t}:{o}" for t in COVARIANCE_TYPES for o in ("map", "cem")]
                    + ["full:varreg", "diag:varreg"])
    def family(self, request):
        return _variant(request.param)
