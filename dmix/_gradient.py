"""The estimator side of gradient training, shared by :class:`dmix.SquaredGaussianMixture` and
``GaussianMixture(fit_method='gradient')``: validating the options, the family's fields, the
seed, and the default stopping rule (the family side is :mod:`dmix.families.gradient`)."""

from __future__ import annotations

import numbers
from dataclasses import replace

from dmix._estimator_base import check_number
from dmix.engine.stopping import NoImprovement, get_criterion
from dmix.errors import InvalidParameterError
from dmix.families._optim import OPTIMIZERS, SCHEDULES

__all__ = ["GRADIENT_PARAMETERS", "GradientMixin"]

#: The numpydoc entries of the gradient options (``dmix._mixture.fill_doc`` puts them in place
#: of ``{gradient_parameters}`` in an estimator's docstring).
GRADIENT_PARAMETERS = """\
    optimizer : {'adam', 'lbfgs'}, default='adam'
        Adam, or L-BFGS with a backtracking line search (one pass per evaluation; full
        batches only).
    learning_rate : float, default=0.05
        Adam's step size (in units of the free parameters: weights, means, log-scales).
    learning_rate_schedule : {'constant', 'cosine', 'exponential'}, default='constant'
        Decay of the step size over ``max_iter`` steps (cosine and exponential to 1/100).
    batch_fraction : float in (0, 1], default=1.0
        Fraction of the chunks each step reads, drawn at random per step (keyed by
        ``random_state`` and the step); 1 reads all (full batch).
    validation_fraction : float in [0, 1), default=0.0
        Fraction of the rows held out (keyed by ``random_state`` and the row's index); with
        held-out rows the fit stops early on their mean log-likelihood and keeps the
        parameters that scored best there.
    n_iter_no_change : int, default=10
        The patience of the default stopping rule (see ``tol``).
"""


class GradientMixin:
    """Options of gradient training for an estimator (see the module docstring)."""

    def _check_gradient_options(self) -> None:
        name = type(self).__name__
        for option, choices in (("optimizer", OPTIMIZERS),
                                ("learning_rate_schedule", SCHEDULES)):
            if getattr(self, option) not in choices:
                raise InvalidParameterError(
                    f"The {option!r} parameter of {name} must be one of {list(choices)}. Got "
                    f"{getattr(self, option)!r} instead.")
        check_number(name, "learning_rate", self.learning_rate, "float", 0, closed_low=False)
        check_number(name, "n_iter_no_change", self.n_iter_no_change, "int", 1)
        for option, low_closed in (("batch_fraction", False), ("validation_fraction", True)):
            value = getattr(self, option)
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
                0 <= value < 1 if low_closed else 0 < value <= 1)
            if not ok:
                interval = "[0, 1)" if low_closed else "(0, 1]"
                raise InvalidParameterError(
                    f"The {option!r} parameter of {name} must be a float in {interval}. Got "
                    f"{value!r} instead.")
        if self.optimizer == "lbfgs" and self.batch_fraction < 1:
            raise InvalidParameterError(
                f"{name}: optimizer='lbfgs' needs full batches (batch_fraction=1.0); got "
                f"batch_fraction={self.batch_fraction!r}. Use optimizer='adam' for stochastic "
                "steps.")

    def _gradient_fields(self) -> dict:
        """The fields of :class:`~dmix.families.gradient.GradientTraining` these options set
        (the schedule spans ``max_iter`` steps; a constant one none, so that a resumed fit
        may run longer)."""
        scheduled = self.learning_rate_schedule != "constant"
        return {"optimizer": self.optimizer, "learning_rate": float(self.learning_rate),
                "learning_rate_schedule": self.learning_rate_schedule,
                "schedule_steps": max(1, int(self.max_iter)) if scheduled else 0,
                "batch_fraction": float(self.batch_fraction),
                "validation_fraction": float(self.validation_fraction)}

    def _gradient_criterion(self):
        """'tol' (the default) is the patience rule of gradient training: stop when the
        objective has not risen by ``tol`` in ``n_iter_no_change`` steps."""
        if self.stopping_criterion == "tol":
            return NoImprovement(patience=int(self.n_iter_no_change), tol=float(self.tol))
        return get_criterion(self.stopping_criterion)

    @staticmethod
    def _gradient_seeded(family, seed: int):
        """The family keyed by the fit's seed (held-out rows, chunk subsets); the seed is
        recorded with the checkpoint's options, not in the family's spec."""
        return replace(family, random_state=int(seed) % 2**63)
