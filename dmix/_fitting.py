"""The Gaussian mixture's own steps of ``fit`` (shared with :func:`dmix.select`): resolving
the MAP prior and initialising a restart with user-given parameters."""

from __future__ import annotations

from dmix.engine import init as _init
from dmix.families.covariance import get_covariance

__all__ = ["FitMixin"]


class FitMixin:
    """Fit steps of :class:`dmix.GaussianMixture` beyond :class:`dmix._mixture.BaseMixture`'s."""

    def _prior_options(self) -> dict:
        return {k: getattr(self, k) for k in (
            "weight_concentration_prior", "mean_prior", "mean_precision_prior",
            "covariance_prior", "degrees_of_freedom_prior")}

    def _resolve_prior(self, data, n_features, passes, moments: dict | None = None):
        """The prior of the options, with defaults from one pass over the data if needed
        (kept in ``moments``, if given, for the next call on the same data)."""
        from dmix.families.priors import resolve_prior

        options = self._prior_options()
        if all(v is None for v in options.values()):
            return None
        moments = {} if moments is None else moments
        mean_default = options["mean_prior"] is None and options["mean_precision_prior"] is not None
        cov_default = options["covariance_prior"] is None and (
            options["degrees_of_freedom_prior"] is not None)
        if (mean_default or cov_default) and not moments:
            _, mean, covariance = _init.data_moments(
                data, n_features=n_features, split_every=passes["split_every"],
                client=passes["client"])
            moments.update(data_mean=mean, data_covariance=covariance)
        return resolve_prior(get_covariance(self.covariance_type).name, self.n_components,
                             n_features, **options, **moments)

    def _initializer(self, family, init_data, user, seed, do_init, passes):
        """``initialize(restart) -> params`` (randomness keyed by ``seed`` and ``restart``)."""

        def initialize(restart):
            if not do_init:
                return self._params
            if len(user) == 3:
                return family.make_params(user["weights"], user["means"],
                                          precisions=user["precisions"])
            params = self._initial_params(family, init_data, seed=seed, restart=restart,
                                          passes=passes)
            if user:
                params = family.make_params(
                    user.get("weights", params["weights"]), user.get("means", params["means"]),
                    **({"precisions": user["precisions"]} if "precisions" in user
                       else {"covariances": params["covariances"]}))
            return params

        return initialize
