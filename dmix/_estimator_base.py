"""What every dmix estimator shares: scikit-learn's parameter protocol, validation of numbers,
and the ``verbose`` messages."""

from __future__ import annotations

import inspect
import numbers

import numpy as np

from dmix.engine.loop import Monitor
from dmix.errors import InvalidParameterError

__all__ = ["ParamsMixin", "UserInitMixin", "VerboseMonitor", "check_number"]


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``repr`` by constructor introspection, as scikit-learn."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return sorted(p.name for p in sig.parameters.values() if p.name != "self")

    def get_params(self, deep: bool = True) -> dict:
        """Parameters of this estimator, as given to the constructor."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params):
        """Set constructor parameters; unknown names raise and list the valid ones."""
        valid = self._param_names()
        for key, value in params.items():
            if key not in valid:
                raise InvalidParameterError(
                    f"Invalid parameter {key!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {valid!r}."
                )
            setattr(self, key, value)
        return self

    def __sklearn_tags__(self):
        """Tags for scikit-learn's model selection tools (imported lazily: optional)."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="density_estimator", target_tags=TargetTags(required=False))

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = [
            f"{k}={v!r}" for k, v in self.get_params().items()
            if not (v is defaults[k] or (np.isscalar(v) and np.isscalar(defaults[k])
                                         and v == defaults[k]))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


class VerboseMonitor(Monitor):
    """scikit-learn's verbose messages: per initialisation, and per iteration when verbose >= 2."""

    def __init__(self, verbose: int, interval: int):
        self.verbose, self.interval = verbose, interval

    def begin_init(self, init):
        if self.verbose:
            print(f"Initialization {init}")

    def end_iteration(self, r):
        if self.verbose >= 2 and r.iteration % self.interval == 0:
            print(f"  Iteration {r.iteration}\t time lapse {r.seconds:.5f}s\t ll change "
                  f"{r.change:.5f}")

    def end_init(self, init, result, seconds):
        if self.verbose:
            state = "converged" if result.converged else "did not converge"
            print(f"Initialization {state}. time lapse {seconds:.5f}s\t lower bound "
                  f"{result.lower_bound:.5f}.")


def check_number(owner, name, value, kind, low, closed_low=True):
    ok_type = (
        isinstance(value, numbers.Integral) if kind == "int" else isinstance(value, numbers.Real)
    ) and not isinstance(value, bool)
    ok = ok_type and (value >= low if closed_low else value > low)
    if not ok:
        bracket = "[" if closed_low else "("
        kind_name = "an int" if kind == "int" else "a float"
        raise InvalidParameterError(
            f"The {name!r} parameter of {owner} must be {kind_name} in the range "
            f"{bracket}{low}, inf). Got {value!r} instead."
        )


class UserInitMixin:
    """Validation of ``weights_init``, ``means_init`` and ``precisions_init``."""

    def _check_user_init(self, family, n_features: int):
        """Validate ``weights_init``, ``means_init`` and ``precisions_init`` (scikit-learn's checks)."""
        k = self.n_components
        out = {}
        if self.weights_init is not None:
            w = np.asarray(self.weights_init, dtype=np.float64)
            if w.shape != (k,):
                raise InvalidParameterError(
                    f"The parameter 'weights' should have the shape of ({k},), but got "
                    f"{w.shape}.")
            if np.any(w < 0) or np.any(w > 1):
                raise InvalidParameterError(
                    "The parameter 'weights' should be in the range [0, 1], but got "
                    f"max value {w.max():.5f}, min value {w.min():.5f}")
            if not np.isclose(w.sum(), 1.0, rtol=0, atol=1e-6):
                raise InvalidParameterError(
                    f"The parameter 'weights' should be normalized, but got sum(weights) = "
                    f"{w.sum():.5f}")
            out["weights"] = w
        if self.means_init is not None:
            m = np.asarray(self.means_init, dtype=np.float64)
            if m.shape != (k, n_features):
                raise InvalidParameterError(
                    f"The parameter 'means' should have the shape of {(k, n_features)}, but "
                    f"got {m.shape}.")
            out["means"] = m
        if self.precisions_init is not None:
            cov = family.covariance
            p = np.asarray(self.precisions_init, dtype=np.float64)
            shape = cov.shape(k, n_features)
            if p.shape != shape:
                raise InvalidParameterError(
                    f"The parameter '{cov.name} precision' should have the shape of {shape}, "
                    f"but got {p.shape}.")
            dense = cov.dense(p, k, n_features)
            if not np.allclose(dense, np.swapaxes(dense, 1, 2)) or np.any(
                np.linalg.eigvalsh(dense) <= 0
            ):
                raise InvalidParameterError(
                    f"'{cov.name} precision' should be symmetric, positive-definite")
            out["precisions"] = p
        return out

