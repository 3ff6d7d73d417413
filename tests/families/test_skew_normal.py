"""The skew-normal mixture family in numbers."""

import numpy as np
import pytest

from dmix.families.skew_normal import SkewNormal
from dmix.testing import FamilyTests


def _true_params(family, d, k, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=4.0, size=(k, d)) + 3.0
    mix = rng.normal(scale=0.3, size=(k, d, d)) + np.eye(d)
    cov = mix @ np.swapaxes(mix, 1, 2)
    skew = rng.choice([-1.0, 1.0], size=(k, d)) * rng.uniform(1.0, 3.0, size=(k, d))
    weights = rng.uniform(0.5, 1.0, size=k)
    return family.make_params(weights / weights.sum(), means, cov, skew)


class TestSkewNormalConformance(FamilyTests):
    """Restricted form, K = 3 in D = 3, 240 rows sampled from known parameters."""

    @pytest.fixture
    def family(self):
        return SkewNormal(reg_covar=1e-6)

    @pytest.fixture
    def data(self, family):
        x, _ = family.sample(_true_params(family, 3, 3), 240, np.random.default_rng(1))
        return x

    @pytest.fixture
    def params(self, family, data):
        true = _true_params(family, 3, 3)
        rng = np.random.default_rng(7)
        return family.make_params([0.2, 0.3, 0.5], true["means"] + rng.normal(scale=0.5, size=(3, 3)),
                                  true["covariances"] * 1.5, 0.5 * true[family.skew_key])


class TestSkewNormalUnrestrictedConformance(TestSkewNormalConformance):
    """Unrestricted form, K = 3 in D = 2 (the exact bivariate E-step)."""

    @pytest.fixture
    def family(self):
        return SkewNormal(form="unrestricted", reg_covar=1e-6)

    @pytest.fixture
    def data(self, family):
        x, _ = family.sample(_true_params(family, 2, 3), 240, np.random.default_rng(1))
        return x

    @pytest.fixture
    def params(self, family, data):
        true = _true_params(family, 2, 3)
        rng = np.random.default_rng(7)
        return family.make_params([0.2, 0.3, 0.5], true["means"] + rng.normal(scale=0.5, size=(3, 2)),
                                  true["covariances"] * 1.5, 0.5 * true[family.skew_key])
