"""The estimator classes by name, for what rebuilds an estimator from its saved settings
(:func:`dmix.load`, :func:`dmix.resume`, the CLI)."""

from __future__ import annotations

__all__ = ["MODELS", "estimator_classes"]

#: ``dmix fit --model NAME``: the estimator class of each model name.
MODELS = {
    "gmm": "GaussianMixture",
    "skew": "SkewNormalMixture",
    "dgmm": "DeepGaussianMixture",
    "gmn": "GaussianMixtureNetwork",
}


def estimator_classes() -> dict[str, type]:
    """Every mixture estimator of dmix, by class name (imported late: the estimators import
    the modules that call this)."""
    from dmix.estimators import GaussianMixture

    return {cls.__name__: cls for cls in (GaussianMixture,)}
