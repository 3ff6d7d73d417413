"""The estimator classes by name, for what rebuilds an estimator from its saved settings
(:func:`dmix.load`, :func:`dmix.resume`, the CLI)."""

from __future__ import annotations

__all__ = ["MODELS", "estimator_classes", "family_defaults"]

#: ``dmix fit --model NAME``: the estimator class of each model name.
MODELS = {
    "gmm": "GaussianMixture",
    "skew": "SkewNormalMixture",
    "dgmm": "DeepGaussianMixture",
    "gmn": "GaussianMixtureNetwork",
    "squared": "SquaredGaussianMixture",
}


def estimator_classes() -> dict[str, type]:
    """Every mixture estimator of dmix, by class name (imported late: the estimators import
    the modules that call this)."""
    from dmix.deep_mixture import DeepGaussianMixture, GaussianMixtureNetwork
    from dmix.estimators import GaussianMixture
    from dmix.skew_normal_mixture import SkewNormalMixture
    from dmix.squared_mixture import SquaredGaussianMixture

    return {cls.__name__: cls for cls in (GaussianMixture, SkewNormalMixture,
                                          DeepGaussianMixture, GaussianMixtureNetwork,
                                          SquaredGaussianMixture)}


def family_defaults(name: str) -> dict:
    """The default hyperparameters of the family called ``name`` (``{}`` if unknown)."""
    import dataclasses

    from dmix.families.deep import DeepGaussian, GaussianNetwork
    from dmix.families.gaussian import Gaussian
    from dmix.families.gaussian_gradient import GaussianGradient
    from dmix.families.skew_normal import SkewNormal
    from dmix.families.squared import SquaredGaussian

    classes = {cls.name: cls for cls in (Gaussian, GaussianGradient, SkewNormal, DeepGaussian,
                                         GaussianNetwork, SquaredGaussian)}
    cls = classes.get(name)
    if cls is None:
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
