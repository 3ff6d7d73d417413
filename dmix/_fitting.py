"""The steps of ``fit`` that :func:`dmix.select` shares with the estimator: preparing the
data, resolving the prior, initialising a restart, and setting the fitted attributes."""

from __future__ import annotations

from dmix.engine import init as _init
from dmix.engine.reduce import check_device_everywhere, place_data
from dmix.errors import InvalidParameterError
from dmix.families.covariance import get_covariance
from dmix.io.source import check_visible_to_workers, with_weights

__all__ = ["FitMixin"]


class FitMixin:
    """Fit steps of :class:`dmix.GaussianMixture`."""

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

    def _prepare_data(self, X, sample_weight, client):
        """``(source, data, init_data, passes, compute)`` of a fit: the validated input, the
        placed data (with the weights as a last column), what initialisation reads, the
        options of every pass, and the E-step's device and precision."""
        source = self._source(X, fitting=True, client=client)
        array = source.array
        if sample_weight is not None:
            if self.missing == "marginalize":
                raise InvalidParameterError(
                    f"{type(self).__name__}: sample_weight with missing='marginalize' is not "
                    "supported; drop the weights or the rows with missing values.")
            array = with_weights(source, sample_weight, client=client)
        check_visible_to_workers(X, client)
        compute = self._compute
        check_device_everywhere(compute, client)
        data = place_data(array, client, in_memory=source.in_memory, persist=self.persist)
        passes = dict(source=source.description, split_every=self.split_every, client=client)
        init_data = data if sample_weight is None else data[:, : source.shape[1]]
        if self.missing == "marginalize":
            init_data = _init.impute_missing(init_data, split_every=self.split_every,
                                             client=client)
        return source, data, init_data, passes, compute

    def _initializer(self, family, init_data, user, seed, do_init, passes):
        """``initialize(restart) -> params`` (randomness keyed by ``seed`` and ``restart``)."""

        def initialize(restart):
            if not do_init:
                return self._params
            if len(user) == 3:
                return family.make_params(user["weights"], user["means"],
                                          precisions=user["precisions"])
            params = _init.initial_params(
                family, init_data, self.n_components, self.init_params, seed=seed,
                restart=restart, **passes)
            if user:
                params = family.make_params(
                    user.get("weights", params["weights"]), user.get("means", params["means"]),
                    **({"precisions": user["precisions"]} if "precisions" in user
                       else {"covariances": params["covariances"]}))
            return params

        return initialize

    def _set_result(self, family, result, n_features: int) -> None:
        self._set_params(family, result.params)
        self.converged_ = result.converged
        self.n_iter_ = result.n_iter
        self.lower_bound_ = result.lower_bound
        self.lower_bounds_ = list(result.lower_bounds)
        self.n_reseeded_ = result.n_reseeded
        self.n_features_in_ = n_features

