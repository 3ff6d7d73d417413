"""Tests of the gradient M-step optimizers (dmix.families._optim): Adam's update by hand, the
schedules, L-BFGS's line-search state machine against SciPy's L-BFGS-B, and exact resume from
a checkpointed state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize

from dmix.engine.loop import EMResult, Snapshot
from dmix.families._optim import (
    LBFGS,
    OPTIMIZERS,
    SCHEDULES,
    Adam,
    make_optimizer,
    scheduled_learning_rate,
)
from dmix.io.checkpoint import CheckpointDir

# -- objectives to maximise: (value, gradient) ----------------------------------------------------


def neg_rosenbrock(x):
    """-Rosenbrock: maximum 0 at (1, 1)."""
    return -scipy.optimize.rosen(x), -scipy.optimize.rosen_der(x)


def concave_quadratic(n=10, condition=1e4, seed=0):
    """``(f, optimum)`` with ``f(x) = -(x'Ax/2 - b'x)``, A's eigenvalues 1 .. condition."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.logspace(0.0, np.log10(condition), n)) @ q.T
    b = rng.normal(size=n)

    def f(x):
        return -(0.5 * x @ a @ x - b @ x), -(a @ x - b)

    return f, np.linalg.solve(a, b)


def maximise(opt, f, x0, max_evals=5000, state=None):
    """Call ``opt.step`` once per evaluation; ``(x, state, evaluations, converged, values of
    the accepted points)``."""
    x, state = np.array(x0, dtype=float), {} if state is None else state
    accepted = []
    for n in range(1, max_evals + 1):
        value, gradient = f(x)
        x, state, converged = opt.step(x, value, gradient, state)
        best = opt.best(state)
        if best is not None and (not accepted or best[1] != accepted[-1]):
            accepted.append(best[1])
        if converged:
            return x, state, n, True, accepted
    return x, state, max_evals, False, accepted


# -- schedules and construction --------------------------------------------------------------------


def test_schedules_at_start_middle_end():
    lr, total = 0.2, 100
    expected = {  # steps 0, total/2, total, 3 total
        "constant": [0.2, 0.2, 0.2, 0.2],
        "cosine": [0.2, 0.2 * (0.01 + 0.99 * 0.5), 0.2 * 0.01, 0.2 * 0.01],
        "exponential": [0.2, 0.2 * 0.1, 0.2 * 0.01, 0.2 * 0.01],
    }
    for schedule in SCHEDULES:
        got = [scheduled_learning_rate(lr, schedule, s, total) for s in (0, 50, 100, 300)]
        assert got == pytest.approx(expected[schedule], rel=1e-14), schedule
    # decaying schedules decrease strictly over the decay
    for schedule in ("cosine", "exponential"):
        rates = [scheduled_learning_rate(lr, schedule, s, total) for s in range(101)]
        assert np.all(np.diff(rates) < 0)


def test_make_optimizer_and_errors():
    assert make_optimizer("adam", learning_rate=0.1, schedule="cosine", total_steps=7) == Adam(
        learning_rate=0.1, schedule="cosine", total_steps=7)
    assert make_optimizer("lbfgs") == LBFGS()
    assert OPTIMIZERS == ("adam", "lbfgs")
    with pytest.raises(ValueError, match=r"'sgd'.*\['adam', 'lbfgs'\]"):
        make_optimizer("sgd")
    with pytest.raises(ValueError, match=r"'linear'.*\['constant', 'cosine', 'exponential'\]"):
        make_optimizer("adam", schedule="linear")
    for lr in (0.0, -1.0, math.nan, math.inf, True):
        with pytest.raises(ValueError, match="learning_rate"):
            make_optimizer("lbfgs", learning_rate=lr)
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer("adam", total_steps=0)
    with pytest.raises(ValueError, match="beta2"):
        Adam(beta2=1.0)
    with pytest.raises(ValueError, match="memory"):
        LBFGS(memory=0)
    with pytest.raises(ValueError, match="c1"):
        LBFGS(c1=1.0)


# -- Adam -------------------------------------------------------------------------------------------


def test_adam_first_steps_by_hand():
    theta = np.array([1.0, -2.0, 0.5, 0.0])
    g = np.array([0.3, -4.0, 1e-9, 0.0])
    opt = Adam(learning_rate=0.1, schedule="cosine", total_steps=4)
    new, state, converged = opt.step(theta, -1.0, g, {})
    # t = 1: mhat = g, vhat = g^2, lr at step 0 is the full rate
    assert new == pytest.approx(theta + 0.1 * g / (np.abs(g) + 1e-8), rel=1e-15, abs=1e-17)
    assert new[:2] == pytest.approx([1.1, -2.1], abs=1e-8)  # theta + lr sign(g)
    assert new[2] == pytest.approx(0.5 + 0.1 * 1e-9 / (1e-9 + 1e-8), rel=1e-12)  # eps matters
    assert new[3] == 0.0 and converged is False
    assert int(state["adam_t"]) == 1 and state["adam_t"].dtype == np.int64
    assert all(isinstance(v, np.ndarray) and v.dtype in (np.float64, np.int64)
               for v in state.values())
    # t = 2 with another gradient, lr at step 1 = 0.1 (0.01 + 0.99 (1 + cos(pi/4)) / 2)
    g2 = np.array([-0.1, 2.0, 0.0, 1.0])
    new2, state2, _ = opt.step(new, -0.5, g2, state)
    m = 0.9 * 0.1 * g + 0.1 * g2
    v = 0.999 * 0.001 * g**2 + 0.001 * g2**2
    lr = 0.1 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi / 4)))
    hand = new + lr * (m / (1 - 0.9**2)) / (np.sqrt(v / (1 - 0.999**2)) + 1e-8)
    assert new2 == pytest.approx(hand, rel=1e-13)
    assert int(state2["adam_t"]) == 2
    assert opt.best(state2) is None


def test_adam_is_deterministic_and_does_not_mutate():
    rng = np.random.default_rng(1)
    theta, g = rng.normal(size=5), rng.normal(size=5)
    opt = Adam()
    _, state, _ = opt.step(theta, 0.0, g, {})
    kept = {k: v.copy() for k, v in state.items()}
    theta_copy, g_copy = theta.copy(), g.copy()
    a = opt.step(theta, 0.0, 2 * g, state)
    b = opt.step(theta, 0.0, 2 * g, state)
    assert np.array_equal(a[0], b[0])
    assert all(np.array_equal(a[1][k], b[1][k]) for k in a[1])
    assert all(np.array_equal(state[k], kept[k]) for k in kept)
    assert np.array_equal(theta, theta_copy) and np.array_equal(g, g_copy)
    opt.reset(state, np.ones(5, bool))
    assert all(np.array_equal(state[k], kept[k]) for k in kept)


def test_adam_reset_zeroes_only_masked_entries():
    opt = Adam(learning_rate=0.01)
    rng = np.random.default_rng(2)
    theta, state = rng.normal(size=6), {}
    for _ in range(5):
        theta, state, _ = opt.step(theta, 0.0, rng.normal(size=6), state)
    mask = np.array([False, True, False, False, True, False])
    reset = opt.reset(state, mask)
    for key in ("adam_m", "adam_v"):
        assert np.all(reset[key][mask] == 0.0)
        assert np.array_equal(reset[key][~mask], state[key][~mask])
        assert np.all(state[key][mask] != 0.0)  # the input state is untouched
    assert int(reset["adam_t"]) == 5  # the schedule's clock runs on
    # the reset entries take a first, bias-corrected step: lr sign(g); the others do not
    g = np.array([1.0, -2.0, 3.0, 1.0, 0.5, -1.0])
    new, _, _ = opt.step(theta, 0.0, g, reset)
    assert (new - theta)[mask] == pytest.approx(0.01 * np.sign(g[mask]), rel=1e-7)
    assert not np.allclose((new - theta)[~mask], 0.01 * np.sign(g[~mask]), rtol=1e-3)
    assert opt.reset({}, mask) == {}


def test_adam_nan_gradient_stays_in_its_entry():
    opt = Adam()
    theta = np.array([0.5, 1.0, -1.0])
    new, state, _ = opt.step(theta, 0.0, np.array([1.0, np.nan, -1.0]), {})
    assert np.isnan(new[1]) and np.all(np.isfinite(new[[0, 2]]))
    assert np.isnan(state["adam_m"][1]) and np.isnan(state["adam_v"][1])
    assert np.all(np.isfinite(state["adam_m"][[0, 2]]))
    new2, state2, _ = opt.step(new, 0.0, np.array([1.0, 1.0, 1.0]), state)
    assert np.isnan(new2[1]) and np.all(np.isfinite(new2[[0, 2]]))
    # reset (as a family does for a re-seeded component) makes the entry finite again
    theta3 = np.where(np.isnan(new2), 0.0, new2)
    new3, state3, _ = opt.step(theta3, 0.0, np.ones(3), opt.reset(state2, np.isnan(new2)))
    assert np.all(np.isfinite(new3)) and np.all(np.isfinite(state3["adam_v"]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_adam_maximises_a_concave_quadratic(schedule):
    f, optimum = concave_quadratic(n=4, condition=10.0, seed=3)
    opt = Adam(learning_rate=0.05, schedule=schedule, total_steps=2000)
    x, state = np.zeros(4), {}
    for _ in range(2000):
        value, gradient = f(x)
        x, state, converged = opt.step(x, value, gradient, state)
        assert converged is False
    assert np.max(np.abs(x - optimum)) < 1e-6
    assert np.max(np.abs(optimum)) > 0.1  # the start is far from it


# -- L-BFGS -----------------------------------------------------------------------------------------


def _scipy(f, x0, gtol):
    res = scipy.optimize.minimize(lambda x: tuple(-v for v in f(x)), x0, jac=True,
                                  method="L-BFGS-B",
                                  options={"gtol": gtol, "ftol": 0.0, "maxiter": 10_000})
    return res.x, res.nfev


@pytest.mark.parametrize("case", ["rosenbrock", "quadratic"])
def test_lbfgs_reaches_the_optimum_as_fast_as_scipy(case):
    if case == "rosenbrock":
        f, x0, optimum = neg_rosenbrock, np.array([-1.2, 1.0]), np.ones(2)
    else:
        f, optimum = concave_quadratic(n=10, condition=1e4, seed=0)
        x0 = np.zeros(10)
    opt = LBFGS(gtol=1e-9, ftol=0.0)
    x, state, evaluations, converged, accepted = maximise(opt, f, x0)
    assert converged
    assert np.max(np.abs(x - optimum)) < 1e-6
    x_scipy, nfev = _scipy(f, x0, gtol=1e-9)
    assert np.max(np.abs(x_scipy - optimum)) < 1e-6
    # measured: rosenbrock 47 (scipy 46), quadratic 168 (scipy 179)
    assert evaluations <= 3 * nfev
    # Armijo never accepts a decrease of the maximised objective
    assert np.all(np.diff(accepted) > 0)
    # the converged step returns the accepted point, which best() gives
    best_x, best_value = opt.best(state)
    assert np.array_equal(x, best_x) and best_value == f(x)[0]


def test_lbfgs_rosenbrock_backtracks_and_never_accepts_an_increase_of_F():
    opt = LBFGS(gtol=1e-9, ftol=0.0)
    x, state, value = np.array([-1.2, 1.0]), {}, None
    backtracks = 0
    for _ in range(200):
        value, gradient = neg_rosenbrock(x)
        before = opt.best(state)
        x, state, converged = opt.step(x, value, gradient, state)
        after = opt.best(state)
        if before is not None:
            if after[1] == before[1]:
                backtracks += 1
            else:  # accepted: Armijo's sufficient decrease of F = -value
                assert after[1] > before[1]
        if converged:
            break
    assert converged and backtracks >= 3


def _one_d(x0=3.0):
    """F(x) = x^2 (value -x^2) from x0 = 3: G = 6, p = -6, first alpha = 1/6, trial 2."""
    opt = LBFGS(min_step=1e-3)
    trial, state, converged = opt.step(np.array([x0]), -x0**2, np.array([-2 * x0]), {})
    assert trial == pytest.approx([2.0], rel=1e-15) and not converged
    assert float(state["lbfgs_alpha"]) == pytest.approx(1 / 6, rel=1e-15)
    return opt, trial, state


def test_lbfgs_backtracks_by_quadratic_interpolation():
    opt, trial, state = _one_d()
    # F(trial) = 9.5 > 9 (Armijo fails): slope -36, the quadratic's minimiser is
    # 36 (1/6)^2 / (2 (9.5 - 9 + 6)) = 1/13, inside [1/60, 1/12]
    nxt, new, converged = opt.step(trial, -9.5, np.array([-4.0]), state)
    assert float(new["lbfgs_alpha"]) == pytest.approx(1 / 13, rel=1e-14)
    assert nxt == pytest.approx([3 - 6 / 13], rel=1e-14) and not converged
    assert opt.best(new) == (np.array([3.0]), -9.0)
    # a far worse trial: the minimiser 1/194 is clipped to 0.1 alpha = 1/60
    nxt, new, _ = opt.step(trial, -100.0, np.array([-4.0]), state)
    assert nxt == pytest.approx([2.9], rel=1e-14)
    # an acceptable trial (F = 4 <= 9 - 1e-4 * 6) is accepted
    nxt, new, _ = opt.step(trial, -4.0, np.array([-4.0]), state)
    assert opt.best(new)[1] == -4.0 and int(new["lbfgs_count"]) == 1


@pytest.mark.parametrize("value, gradient", [(math.nan, -4.0), (-math.inf, -4.0),
                                             (-4.0, math.nan)])
def test_lbfgs_non_finite_trial_backtracks(value, gradient):
    opt, trial, state = _one_d()
    nxt, new, converged = opt.step(trial, value, np.array([gradient]), state)
    assert nxt == pytest.approx([2.5], rel=1e-15) and not converged  # alpha / 2 = 1/12
    assert opt.best(new) == (np.array([3.0]), -9.0)  # the failed trial is not accepted


def test_lbfgs_gives_up_below_min_step_at_the_accepted_point():
    opt, x, state = _one_d()
    for n in range(1, 20):  # alpha = 1/6 halves: 1/1536 < min_step = 1e-3 at the 8th failure
        x, state, converged = opt.step(x, math.nan, np.array([math.nan]), state)
        if converged:
            break
    assert n == 8 and converged
    assert np.array_equal(x, [3.0])  # the accepted point, never the failed trial
    # evaluating it again accepts it as it is and goes on from there
    x, state, converged = opt.step(x, -9.0, np.array([-6.0]), state)
    assert not converged and x == pytest.approx([2.0], rel=1e-15)


def test_lbfgs_converges_at_a_stationary_start_and_rejects_a_non_finite_one():
    opt = LBFGS()
    x, state, converged = opt.step(np.array([1.0, 2.0]), 5.0, np.array([0.0, 1e-7]), {})
    assert converged and np.array_equal(x, [1.0, 2.0]) and opt.best(state)[1] == 5.0
    assert opt.best({}) is None
    with pytest.raises(FloatingPointError, match="not finite"):
        opt.step(np.array([1.0]), math.nan, np.array([1.0]), {})
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        opt.step(np.array([1.0, 2.0, 3.0]), 0.0, np.ones(3), state)
    with pytest.raises(ValueError, match="gradient has shape"):
        Adam().step(np.ones(3), 0.0, np.ones(2), {})


def test_lbfgs_reset_clears_memory_keeps_the_accepted_point():
    opt = LBFGS()
    x, state, *_ = maximise(opt, neg_rosenbrock, [-1.2, 1.0], max_evals=12)
    assert int(state["lbfgs_count"]) > 0
    reset = opt.reset(state, np.array([True, False]))
    assert int(reset["lbfgs_count"]) == 0 and not np.any(reset["lbfgs_s"])
    assert int(state["lbfgs_count"]) > 0  # the input is untouched
    best_x, best_value = opt.best(reset)
    assert np.array_equal(best_x, opt.best(state)[0]) and best_value == opt.best(state)[1]
    # the next point (any point: a re-seeded one) is accepted as it is, even if worse
    far = np.array([3.0, -2.0])
    value, gradient = neg_rosenbrock(far)
    _, after, converged = opt.step(far, value, gradient, reset)
    assert opt.best(after)[1] == value < best_value and not converged
    assert opt.reset({}, np.array([True])) == {}


def test_lbfgs_converges_on_ftol_and_state_dtypes():
    opt = LBFGS(gtol=0.0, ftol=1e-6)
    x, state, evaluations, converged, _ = maximise(opt, neg_rosenbrock, [-1.2, 1.0])
    assert converged and evaluations < 47
    assert np.array_equal(x, opt.best(state)[0])
    for key, v in state.items():
        assert key.startswith("lbfgs_") and isinstance(v, np.ndarray)
        assert v.dtype in (np.float64, np.int64)


# -- exact resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [Adam(learning_rate=0.02, schedule="cosine", total_steps=30),
                                 LBFGS(memory=4, gtol=0.0, ftol=0.0)])
def test_resume_from_a_checkpointed_state_is_bit_identical(opt, tmp_path):
    x0 = np.array([-1.2, 1.0])
    straight, straight_state, n, *_ = maximise(opt, neg_rosenbrock, x0, max_evals=30)
    assert n == 30

    half, state, *_ = maximise(opt, neg_rosenbrock, x0, max_evals=15)
    ckpt = CheckpointDir(tmp_path / "ckpt")
    ckpt.save(Snapshot(0, EMResult(params={"theta": half}, lower_bound=0.0, n_iter=15),
                       state))
    loaded = CheckpointDir(tmp_path / "ckpt").load().snapshot
    assert sorted(loaded.state) == sorted(state)
    assert all(loaded.state[k].dtype == state[k].dtype for k in state)
    resumed, resumed_state, *_ = maximise(opt, neg_rosenbrock, loaded.run.params["theta"],
                                          max_evals=15, state=loaded.state)
    assert np.array_equal(resumed, straight)
    assert all(np.array_equal(resumed_state[k], straight_state[k]) for k in straight_state)
    assert not np.array_equal(half, straight)
