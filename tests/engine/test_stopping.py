"""Tests of the stopping criteria (dmix.engine.stopping): the numbers each rule stops at on
known sequences, converged versus budget, the specs and their JSON round trip, the errors."""

from __future__ import annotations

import json
import math

import pytest

from dmix.engine.stopping import (
    Aitken,
    AnyOf,
    FitHistory,
    NoImprovement,
    Relative,
    Stop,
    Tol,
    WallClock,
    criterion_spec,
    get_criterion,
    stop_reason,
)
from dmix.errors import InvalidParameterError


def history(values, tol=1e-3, seconds=None, initial=-math.inf):
    values = tuple(values)
    seconds = (1.0,) * len(values) if seconds is None else tuple(seconds)
    return FitHistory(values, seconds, tol, initial)


def first_stop(criterion, values, tol=1e-3, seconds=None):
    """The number of iterations after which ``criterion`` first stops on ``values`` (fed one
    more value per iteration, as the loop does), or None."""
    values = list(values)
    for n in range(1, len(values) + 1):
        secs = None if seconds is None else seconds[:n]
        if criterion(history(values[:n], tol, secs)):
            return n
    return None


def geometric(limit, c, r, n):
    """``l_t = limit - c r^t`` for t = 0..n-1: EM's linear convergence, exactly."""
    return [limit - c * r**t for t in range(n)]


# -- FitHistory ------------------------------------------------------------------------------


def test_history_properties():
    h = history([-3.0, -2.5, -2.25], seconds=[0.5, 0.25, 0.125])
    assert h.n_iter == 3
    assert h.elapsed == 0.875
    assert h.change == 0.25
    assert history([-3.0]).change == math.inf  # as run_em: l_1 - (-inf)
    assert history([]).change == math.inf and history([]).n_iter == 0
    # a warm start measures the first change from the previous fit's lower bound
    assert history([-2.5], initial=-3.0).change == 0.5
    assert isinstance(h.lower_bounds, tuple) and history([1, 2]).lower_bounds == (1.0, 2.0)


def test_history_needs_one_duration_per_value():
    with pytest.raises(InvalidParameterError, match="2 lower bounds and 1 durations"):
        FitHistory((1.0, 2.0), (0.5,), 1e-3)


# -- Tol -------------------------------------------------------------------------------------


def test_tol_is_run_em_rule():
    values = [-3.0, -2.5, -2.5 + 2**-11, -2.5 + 2**-11 + 2**-13]  # all exact in binary
    # changes: inf, 0.5, 4.9e-4 (< 1e-3: stop after 3 iterations), 1.2e-4
    assert first_stop(Tol(), values, tol=1e-3) == 3
    assert first_stop(Tol(), values, tol=2**-13) is None  # 2^-13 is not < 2^-13
    assert first_stop(Tol(), values, tol=2**-13 + 1e-12) == 4
    assert first_stop(Tol(2**-13), values, tol=1.0) is None  # its own tol wins over the history's
    assert first_stop(Tol(0.6), values, tol=1e-9) == 2
    # a decrease counts by its size
    assert Tol()(history([-2.0, -2.0005], tol=1e-3))
    assert not Tol()(history([-2.0], tol=math.inf - 1))  # the first change is inf, never < tol


def test_tol_stops_short_of_the_limit_on_slow_sequences():
    # l_t = -2 - 0.9^t (t = 0, 1, ...): the step 0.1 * 0.9^(t-1) first falls under 1e-3 at
    # t = 45, the 46th value
    values = geometric(-2.0, 1.0, 0.9, 200)
    n = first_stop(Tol(), values, tol=1e-3)
    assert n == 46  # 0.9^44 * 0.1 = 9.7e-4 < 1e-3 < 0.9^43 * 0.1
    assert abs(values[n - 1] - (-2.0)) == pytest.approx(0.9**45, rel=1e-9)  # 8.7e-3: 8.7 tol


# -- Relative --------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-3, 1.0, 7.0, 1e6])
def test_relative_does_not_depend_on_the_scale(scale):
    values = [scale * v for v in geometric(-2.0, 1.0, 0.5, 60)]
    # |l_t - l_{t-1}| = 0.5^t < 1e-4 * |l_t| ~ 2e-4 first at t = 13 (0.5^13 = 1.2e-4), 14 values
    assert first_stop(Relative(1e-4), values) == 14
    assert first_stop(Relative(), values, tol=1e-4) == 14


def test_tol_depends_on_the_scale_where_relative_does_not():
    base = geometric(-2.0, 1.0, 0.5, 60)
    stops = {s: first_stop(Tol(1e-4), [s * v for v in base]) for s in (1e-3, 1.0, 1e6)}
    assert stops == {1e-3: 5, 1.0: 15, 1e6: 35}


def test_relative_numbers():
    assert Relative(1e-3)(history([-1000.0, -1000.9]))  # 0.9 < 1.0009
    assert not Relative(1e-3)(history([-1000.0, -1001.1]))  # 1.1 > 1.0011
    assert not Relative(1e-3)(history([-1000.0]))
    assert Relative(1e-3)(history([-1001.1], initial=-1000.0)) is False
    # at l_t = 0 it never stops, not even at a fixed point (0 < 0 is false; so is Tol(0))
    assert not Relative(0.5)(history([1e-12, 0.0])) and not Relative(0.5)(history([0.0, 0.0]))
    assert not Tol(0.0)(history([0.0, 0.0]))


# -- Aitken ----------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0.1, 0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("limit, c", [(-2.0, 1.0), (-14.4, 3.5), (10.0, 1e-3)])
def test_aitken_limit_of_a_geometric_sequence_is_exact(limit, c, r):
    values = geometric(limit, c, r, 8)
    # Exact up to the rounding of the values themselves (eps |L| each), which the second
    # difference in the denominator amplifies by about 1 / (1 - r)^2: 1e-12 up to r = 0.9.
    eps = 2.0**-52 * max(1.0, abs(limit))
    atol = max(1e-12, 4 * eps / (1 - r) ** 2)
    for t in range(1, 7):
        estimate = Aitken.limit(*values[t - 1:t + 2])
        assert estimate == pytest.approx(limit, rel=0, abs=atol)
        if r <= 0.9:
            assert abs(estimate - limit) <= 1e-12 * max(1.0, abs(limit))


def test_aitken_bounds_the_distance_to_the_limit():
    # l_t = -2 - 0.9^t. Aitken stops when |l_inf - l_t| = 0.9^t < 1e-3, t the middle of the
    # last three: t = 66 (0.9^66 = 9.6e-4, 0.9^65 = 1.07e-3), after 68 values.
    values = geometric(-2.0, 1.0, 0.9, 200)
    n_aitken = first_stop(Aitken(), values, tol=1e-3)
    n_tol = first_stop(Tol(), values, tol=1e-3)
    assert (n_aitken, n_tol) == (68, 46)
    # Aitken's stop is within tol of the limit; Tol's, with the same tol, is 8.7 tol away
    assert abs(values[n_aitken - 1] + 2.0) < 1e-3
    assert abs(values[n_tol - 1] + 2.0) > 8 * 1e-3
    # the slower the sequence, the further Tol stops from the limit; Aitken never more than tol
    for r in (0.5, 0.9, 0.99):
        values = geometric(-2.0, 1.0, r, 2000)
        n_aitken = first_stop(Aitken(), values, tol=1e-4)
        n_tol = first_stop(Tol(), values, tol=1e-4)
        assert abs(values[n_aitken - 1] + 2.0) < 1e-4
        assert abs(values[n_tol - 1] + 2.0) == pytest.approx(1e-4 * r / (1 - r), rel=1 - r + 1e-9)


def test_aitken_and_tol_agree_on_fast_sequences():
    # r = 0.3: Tol at 0.7 * 0.3^t < 1e-3 (t = 6), Aitken at 0.3^t < 1e-3 (t = 6): both 8 values
    values = geometric(-2.0, 1.0, 0.3, 50)
    assert first_stop(Aitken(), values) == first_stop(Tol(), values) == 8


def test_aitken_guards():
    assert not Aitken(1.0)(history([-3.0, -2.0]))  # needs three values
    assert Aitken(1.0)(history([-2.0, -1.9], initial=-2.5))  # a warm start's value counts
    assert not Aitken(1e9)(history([0.0, 1.0, 3.0]))  # a = 2: growing steps, no limit
    assert not Aitken(1e9)(history([0.0, 1.0, 2.0]))  # a = 1: division by zero
    assert not Aitken(1e9)(history([1.0, 1.0, 2.0]))  # 0 then a step: a infinite
    assert Aitken(1e-300)(history([1.0, 1.0, 1.0]))  # a fixed point
    assert math.isnan(Aitken.limit(0.0, 1.0, 3.0)) and Aitken.limit(1.0, 1.0, 1.0) == 1.0
    # oscillation (a = -0.5): l_inf = 1 + (-0.5) / 1.5 = 2/3
    assert Aitken.limit(0.0, 1.0, 0.5) == pytest.approx(2 / 3, abs=1e-15)
    assert Aitken(0.34)(history([0.0, 1.0, 0.5])) and not Aitken(0.33)(history([0.0, 1.0, 0.5]))


# -- NoImprovement -----------------------------------------------------------------------------


def test_no_improvement_waits_patience_iterations_past_the_best():
    # best value 0.0 at the 3rd; then 4 values no better: with patience 3, the window of the
    # 6th value (-0.5, -0.2, -0.1) is the first whose best is not above 0.0 + tol
    values = [-2.0, -1.0, 0.0, -0.5, -0.2, -0.1, -0.3]
    assert first_stop(NoImprovement(3, tol=0.0), values) == 6
    assert first_stop(NoImprovement(4, tol=0.0), values) == 7
    assert first_stop(NoImprovement(5, tol=0.0), values) is None
    assert first_stop(NoImprovement(1, tol=0.0), values) == 4  # the first value not above
    # tol: an improvement must exceed it; 0.0 -> 0.25 is one with tol 0.2, not with tol 0.25
    rising = [-1.0, 0.0, -0.1, 0.25, 0.1, 0.2, 0.0]
    assert first_stop(NoImprovement(3, tol=0.2), rising) == 7
    assert first_stop(NoImprovement(3, tol=0.25), rising) == 5
    assert first_stop(NoImprovement(3), rising, tol=0.25) == 5  # the history's tol by default


def test_no_improvement_needs_patience_plus_one_values():
    flat = [1.0] * 6
    assert first_stop(NoImprovement(5, tol=0.0), flat) == 6
    assert not NoImprovement(5, tol=1.0)(history(flat[:5]))
    # a warm start's initial value counts as the first
    assert NoImprovement(5, tol=0.0)(history(flat[:5], initial=1.0))
    assert NoImprovement.converges and NoImprovement().patience == 10


def test_no_improvement_measures_against_the_best_before_the_window():
    # +0.6 tol per iteration: scikit-learn's running best would stop this run, this rule does
    # not (the window gains 3 * 0.6 = 1.8 tol over the value before it)
    creeping = [0.6e-3 * t for t in range(30)]
    assert first_stop(NoImprovement(3), creeping, tol=1e-3) is None
    assert first_stop(NoImprovement(1), creeping, tol=1e-3) == 2
    # a noisy, non-monotone run: stops once the last best (t = 4) is 2 values old
    noisy = [-3.0, -1.0, -2.0, -0.9, -0.5, -0.7, -0.6, -0.55]
    assert first_stop(NoImprovement(2, tol=0.0), noisy) == 7
    assert first_stop(Tol(), noisy, tol=0.06) == 8  # Tol stops on |change| alone


def test_no_improvement_nan_counts_as_no_improvement():
    assert NoImprovement(2, tol=0.0)(history([1.0, math.nan, math.nan]))
    assert NoImprovement(2, tol=0.0)(history([1.0, math.nan, 0.5]))
    assert not NoImprovement(2, tol=0.0)(history([1.0, math.nan, 1.5]))
    assert not NoImprovement(1, tol=0.0)(history([math.nan, -5.0]))  # -5 > -inf


# -- WallClock, AnyOf, stop_reason --------------------------------------------------------------


def test_wall_clock_is_a_budget():
    values = [-3.0, -2.0, -1.5, -1.25]
    seconds = [0.25, 0.5, 0.25, 0.5]  # elapsed: 0.25, 0.75, 1.0, 1.5
    assert first_stop(WallClock(1.0), values, seconds=seconds) == 3  # elapsed >= seconds
    assert first_stop(WallClock(0.9), values, seconds=seconds) == 3
    assert first_stop(WallClock(1.25), values, seconds=seconds) == 4
    assert first_stop(WallClock(2.0), values, seconds=seconds) is None
    assert first_stop(WallClock(0), values, seconds=seconds) == 1
    h = history(values[:3], seconds=seconds[:3])
    assert stop_reason(WallClock(1.0), h) is Stop.BUDGET
    assert stop_reason(WallClock(1.5), h) is None
    assert WallClock.converges is False and Tol.converges and Aitken.converges


def test_stop_reason():
    h = history([-3.0, -2.9995])
    assert stop_reason(Tol(), h) is Stop.CONVERGED
    assert stop_reason(Tol(1e-4), h) is None
    assert stop_reason(lambda h: True, h) is Stop.CONVERGED  # a user callable: converged
    assert stop_reason(lambda h: False, h) is None

    class Budget:
        converges = False

        def __call__(self, h):
            return h.n_iter >= 2

    assert stop_reason(Budget(), h) is Stop.BUDGET
    assert Stop.CONVERGED == "converged" and json.dumps(Stop.BUDGET) == '"budget"'


def test_any_of():
    values = [-3.0, -2.0, -1.9995, -1.9994]
    seconds = [1.0, 1.0, 1.0, 1.0]
    either = AnyOf(Tol(1e-3), WallClock(2.0))
    assert first_stop(either, values, seconds=seconds) == 2  # the budget first
    h2 = history(values[:2], seconds=seconds[:2])
    h3 = history(values[:3], seconds=seconds[:3])
    assert stop_reason(either, h2) is Stop.BUDGET
    assert stop_reason(either, h3) is Stop.CONVERGED  # both fire: convergence wins
    later = AnyOf(Tol(1e-3), WallClock(10.0))
    assert first_stop(later, values, seconds=seconds) == 3 and stop_reason(later, h3) == "converged"
    assert stop_reason(AnyOf(WallClock(10.0), lambda h: h.n_iter >= 2), h2) is Stop.CONVERGED
    nested = AnyOf(AnyOf(WallClock(2.0)), Relative(1e-9))
    assert stop_reason(nested, h2) is Stop.BUDGET and stop_reason(nested, h3) is Stop.BUDGET
    assert AnyOf([Tol(), Aitken()]) == AnyOf(Tol(), Aitken())
    assert not AnyOf(Tol(1e-9), WallClock(5.0))(h2)


# -- specs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    (None, Tol()),
    ("tol", Tol()),
    ("TOL", Tol()),
    ("relative", Relative()),
    ("aitken", Aitken()),
    ("aitken:1e-6", Aitken(1e-6)),
    ("relative: 1e-5", Relative(1e-5)),
    ("wall_clock:600", WallClock(600)),
    ("wall-clock:1.5", WallClock(1.5)),
    ("aitken|wall_clock:600", AnyOf(Aitken(), WallClock(600))),
    ("no_improvement", NoImprovement()),
    ("no_improvement:20", NoImprovement(20)),
    ("No-Improvement: 3|wall_clock:5", AnyOf(NoImprovement(3), WallClock(5))),
    ({"name": "no_improvement", "patience": 20, "tol": 1e-4}, NoImprovement(20, 1e-4)),
    ({"name": "no_improvement"}, NoImprovement(10)),
    ({"name": "tol"}, Tol()),
    ({"name": "aitken", "tol": 1e-6}, Aitken(1e-6)),
    ({"name": "wall_clock", "seconds": 600}, WallClock(600.0)),
    ({"name": "any_of", "criteria": ["tol", {"name": "wall_clock", "seconds": 5}]},
     AnyOf(Tol(), WallClock(5))),
    (["relative", "wall_clock:60"], AnyOf(Relative(), WallClock(60))),
    (Aitken(1e-4), Aitken(1e-4)),
])
def test_get_criterion(spec, expected):
    assert get_criterion(spec) == expected


def test_get_criterion_tol_fills_the_named_criteria():
    assert get_criterion(None, 1e-4) == Tol(1e-4)
    assert get_criterion("aitken", 1e-4) == Aitken(1e-4)
    assert get_criterion("aitken:1e-6", 1e-4) == Aitken(1e-6)  # its own tol wins
    assert get_criterion("aitken|wall_clock:9", 1e-4) == AnyOf(Aitken(1e-4), WallClock(9))
    assert get_criterion("no_improvement:4", 1e-4) == NoImprovement(4, 1e-4)
    assert get_criterion(Tol(), 1e-4) == Tol()  # an object is returned as it is


def test_user_callable_is_returned_as_is():
    def mine(h):
        return h.n_iter >= 3

    assert get_criterion(mine) is mine
    assert criterion_spec(mine) is None
    assert criterion_spec(AnyOf(Tol(), mine)) is None
    assert first_stop(get_criterion(mine), [1.0, 2.0, 3.0, 4.0]) == 3


@pytest.mark.parametrize("spec", [
    None, "tol", "relative:1e-5", "aitken", "aitken:1e-8", "wall_clock:600",
    "aitken|wall_clock:0.5", {"name": "relative", "tol": 0.25},
    ["tol", ["aitken:1e-6", "wall_clock:3"]],
    "no_improvement", "no_improvement:20", {"name": "no_improvement", "patience": 7, "tol": 0.5},
    "no_improvement:3|wall_clock:60",
])
def test_spec_round_trips_through_json(spec):
    criterion = get_criterion(spec)
    saved = json.dumps(criterion_spec(criterion))
    assert get_criterion(json.loads(saved)) == criterion
    assert criterion_spec(get_criterion(json.loads(saved))) == json.loads(saved)


def test_spec_values():
    assert criterion_spec(Tol()) == {"name": "tol"}
    assert criterion_spec(Aitken(1e-6)) == {"name": "aitken", "tol": 1e-6}
    assert criterion_spec(WallClock(600)) == {"name": "wall_clock", "seconds": 600.0}
    assert criterion_spec(NoImprovement(20)) == {"name": "no_improvement", "patience": 20}
    assert criterion_spec(NoImprovement(3, 1e-4)) == {"name": "no_improvement", "patience": 3,
                                                      "tol": 1e-4}
    assert criterion_spec(get_criterion("aitken|wall_clock:600")) == {
        "name": "any_of",
        "criteria": [{"name": "aitken"}, {"name": "wall_clock", "seconds": 600.0}],
    }


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, fragment", [
    ("aitkin", "'aitkin'"),
    ("", "''"),
    ("wall_clock", "needs its seconds"),
    ("wall_clock:-1", "-1"),
    ("wall_clock:nan", "nan"),
    ("wall_clock:inf", "inf"),
    ("aitken:abc", "'abc' is not a number"),
    ("tol:-0.5", "-0.5"),
    ("aitken|bogus", "'bogus'"),
    ("no_improvement:2.5", "'2.5' is not an integer"),
    ("no_improvement:1e1", "'1e1' is not an integer"),
    ("no_improvement:abc", "'abc' is not an integer"),
    ("no_improvement:0", "int >= 1"),
    ("no_improvement:-3", "-3"),
    ({"name": "no_improvement", "patience": 2.0}, "Got 2.0"),
    ({"name": "no_improvement", "patience": True}, "Got True"),
    ({"name": "no_improvement", "tol": -1.0}, "-1.0"),
    ({"name": "no_improvement", "seconds": 3}, "'seconds'"),
    ({"name": "wall_clock", "seconds": -5}, "-5"),
    ({"name": "wall_clock", "seconds": float("nan")}, "nan"),
    ({"name": "wall_clock"}, "wall_clock"),
    ({"name": "tol", "seconds": 3}, "'seconds'"),
    ({"seconds": 3}, "missing 'name'"),
    ({"name": "nope"}, "'nope'"),
    ({"name": "any_of", "criteria": "tol"}, "any_of"),
    (42, "42"),
    (1.5, "1.5"),
    (True, "True"),
    (object(), "object"),
    (Aitken, "instance"),
    ([], "at least one"),
])
def test_invalid_specs(spec, fragment):
    with pytest.raises(InvalidParameterError) as info:
        get_criterion(spec)
    message = str(info.value)
    assert fragment in message
    if not isinstance(spec, list):
        assert "Invalid stopping criterion" in message
        assert ("['aitken', 'any_of', 'no_improvement', 'relative', 'tol', 'wall_clock']"
                in message)


@pytest.mark.parametrize("build", [
    lambda: Tol(-1e-3), lambda: Relative(float("nan")), lambda: Aitken(math.inf),
    lambda: Tol("0.1"), lambda: WallClock(-1), lambda: WallClock(float("nan")),
    lambda: WallClock(True), lambda: get_criterion("tol", tol=-1.0), lambda: AnyOf(),
    lambda: NoImprovement(0), lambda: NoImprovement(2.5), lambda: NoImprovement(3, -1e-3),
])
def test_invalid_numbers(build):
    with pytest.raises(InvalidParameterError):
        build()


def test_errors_are_value_and_type_errors():
    with pytest.raises(ValueError):
        get_criterion("nope")
    with pytest.raises(TypeError):
        get_criterion(3)
