"""Conformance tests every mixture family must pass, shipped with the library.

A family's test module subclasses :class:`FamilyTests` and provides three pytest fixtures --
``family`` (an instance), ``params`` (parameters to evaluate the E-step at, away from a fixed
point of EM) and ``data`` (a NumPy block of a few hundred rows that ``params`` fit reasonably)::

    import pytest
    from dmix.testing import FamilyTests

    class TestMyFamily(FamilyTests):
        @pytest.fixture
        def family(self):
            return MyFamily(reg_covar=1e-6)

        @pytest.fixture
        def params(self, family, data):
            return family.make_params(...)

        @pytest.fixture
        def data(self):
            return np.random.default_rng(0).normal(size=(200, 3))

Every property below is a test method that asserts numbers. The family methods are called
directly with ``xp=numpy`` (no Dask), except :meth:`FamilyTests.test_engine_chunking`, which
runs the engine's :func:`dmix.engine.loop.estep_pass` on a Dask array with the synchronous
scheduler. The module needs pytest and hypothesis (the ``dev`` extra); Dask is imported only
by that one test.

Class attributes a subclass may override:

``rtol``
    Relative tolerance of "the same statistics" (default ``1e-10``), measured per key against
    the largest magnitude of that key (see :func:`stats_max_rel_error`).
``monotone``
    Whether EM (``estep`` then ``mstep``) never decreases the log-likelihood. Gradient-fitted
    families set it to False and the monotonicity test is skipped.
``weights_key``
    Name of the mixing-weights parameter, for the re-weighting identity of
    :meth:`FamilyTests.test_log_density_consistent_with_predict_proba` (None skips it).
``em_iterations``
    Number of EM steps of the monotonicity test.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmix.errors import ConvergenceWarning
from dmix.families.base import REQUIRED_STATS

__all__ = [
    "FamilyTests",
    "assert_rel",
    "assert_stats_allclose",
    "combine_all",
    "rel_err",
    "split_rows",
    "split_points",
    "stats_max_rel_error",
    "structured_covariances",
]

#: Hypothesis settings of the property tests: few examples (each is a handful of E-steps),
#: reproducible (no example database, fixed seed), fixtures reused across examples on purpose
#: (they are read-only), and the same test methods run by several subclasses (one per family
#: or covariance type: "differing executors", harmless without an example database).
PROPERTY_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.differing_executors,
    ],
)


# -- helpers ----------------------------------------------------------------------------------


def rel_err(actual, expected) -> float:
    """Largest absolute difference over the largest magnitude of ``expected`` (normwise, so
    entries small through cancellation are not held to an element-wise relative tolerance)."""
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def assert_rel(actual, expected, tol: float, what: str = "") -> None:
    """Assert ``rel_err(actual, expected) <= tol`` with a short message."""
    err = rel_err(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3g} > {tol:g}"


def structured_covariances(dense: np.ndarray, covariance_type: str) -> np.ndarray:
    """Parameters of ``covariance_type`` from (K, D, D) SPD matrices, for building test models:
    their mean when tied, their diagonals when diagonal, the mean variance when spherical."""
    diag = np.diagonal(dense, axis1=1, axis2=2)
    return {
        "full": dense,
        "tied": dense.mean(axis=0),
        "diag": diag,
        "spherical": diag.mean(axis=1),
        "tied_diag": diag.mean(axis=0),
        "tied_spherical": np.asarray(diag.mean()),
    }[covariance_type]


def split_points(n_rows: int, max_pieces: int = 12):
    """Hypothesis strategy of sorted, distinct cut points that split ``n_rows`` rows.

    Parameters
    ----------
    n_rows : int
        Rows of the block to split (at least 2).
    max_pieces : int, default=12
        Largest number of pieces.

    Returns
    -------
    hypothesis.strategies.SearchStrategy of list of int
        Cut points in ``[1, n_rows - 1]``; adjacent cuts give 1-row pieces, and the pieces are
        in general of uneven sizes. Shrinking moves cuts towards the first rows.
    """
    return st.lists(
        st.integers(1, n_rows - 1), min_size=1, max_size=max_pieces - 1, unique=True
    ).map(sorted)


def split_rows(x: np.ndarray, cuts) -> list[np.ndarray]:
    """Split ``x`` along rows at the sorted cut points ``cuts``.

    Parameters
    ----------
    x : ndarray of shape (n, D)
        The block.
    cuts : sequence of int
        Sorted row indices where a new piece starts.

    Returns
    -------
    list of ndarray
        ``len(cuts) + 1`` consecutive pieces whose concatenation is ``x``.
    """
    return np.split(x, list(cuts), axis=0)


def combine_all(family, parts):
    """Left fold of ``family.combine`` over a non-empty sequence of statistics.

    Parameters
    ----------
    family : Family
        The family whose ``combine`` merges the statistics.
    parts : sequence of Stats
        Statistics of consecutive pieces.

    Returns
    -------
    Stats
        ``combine(...combine(combine(parts[0], parts[1]), parts[2])..., parts[-1])``.
    """
    total = parts[0]
    for part in parts[1:]:
        total = family.combine(total, part)
    return total


def stats_max_rel_error(actual, expected) -> float:
    """Largest per-key relative difference of two statistics dictionaries.

    For every key, the largest absolute difference divided by the largest magnitude of the
    expected value (1 if that is 0). Sums with cancellation (first moments about a shift,
    off-diagonal second moments) have entries much smaller than their terms, so an
    element-wise relative error would measure rounding noise, not a discrepancy.

    Parameters
    ----------
    actual, expected : Stats
        Dictionaries with the same keys.

    Returns
    -------
    float
        The largest relative difference over all keys (``inf`` if a value is not finite).
    """
    worst = 0.0
    for key in expected:
        a = np.asarray(actual[key], dtype=np.float64)
        e = np.asarray(expected[key], dtype=np.float64)
        if a.shape != e.shape:
            raise AssertionError(f"Statistic {key!r} has shape {a.shape}, expected {e.shape}.")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
            return float("inf")
        if e.size == 0:
            continue
        scale = float(np.max(np.abs(e))) or 1.0
        worst = max(worst, float(np.max(np.abs(a - e))) / scale)
    return worst


def assert_stats_allclose(actual, expected, rtol: float) -> None:
    """Assert that two statistics dictionaries have the same keys and agree within ``rtol``.

    Parameters
    ----------
    actual, expected : Stats
        The statistics to compare.
    rtol : float
        Tolerance on :func:`stats_max_rel_error`.

    Raises
    ------
    AssertionError
        Naming the keys that differ and by how much.
    """
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    bad = {
        key: stats_max_rel_error({key: actual[key]}, {key: expected[key]})
        for key in expected
    }
    bad = {key: err for key, err in bad.items() if not err <= rtol}
    assert not bad, f"statistics differ beyond rtol={rtol:g}: {bad}"


def _assert_params_equal(actual, expected) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(expected[key]),
                                      err_msg=key)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    amax = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(np.log(np.sum(np.exp(a - amax), axis=axis, keepdims=True)) + amax, axis)


# -- the suite ---------------------------------------------------------------------------------


def _estep(family, params, x, xp, *, start: int = 0, **kwargs):
    """``family.estep``, told the global index ``start`` of the first row if the family keys
    random draws by it (``needs_row_index``; see dmix.families.base)."""
    if getattr(family, "needs_row_index", False):
        kwargs["start"] = start
    return family.estep(params, x, xp, **kwargs)


def _estep_pieces(family, params, data, cuts) -> list:
    """The statistics of the consecutive pieces of ``data`` cut at ``cuts``."""
    starts = [0, *cuts]
    return [_estep(family, params, piece, np, start=start)
            for start, piece in zip(starts, split_rows(data, cuts), strict=True)]


class FamilyTests:
    """The properties every mixture family must pass (subclass it; see the module docstring).

    Fixtures the subclass provides: ``family``, ``params``, ``data``. Fixture provided here and
    overridable: ``unregularized_family`` (the family without variance regularisation, for the
    monotonicity test; by default ``dataclasses.replace(family, reg_covar=0.0)`` when the family
    has a ``reg_covar`` field).
    """

    rtol: float = 1e-10
    monotone: bool = True
    weights_key: str | None = "weights"
    em_iterations: int = 25

    @pytest.fixture
    def unregularized_family(self, family):
        """The family with its regularisation switched off (``reg_covar=0``), if it has one."""
        names = {f.name for f in dataclasses.fields(family)}
        return dataclasses.replace(family, reg_covar=0.0) if "reg_covar" in names else family

    # 1. Chunking does not change the statistics ------------------------------------------

    @PROPERTY_SETTINGS
    @given(hyp=st.data())
    def test_chunking_does_not_change_stats(self, family, params, data, hyp):
        """estep on the whole block == combine of estep on random consecutive pieces."""
        whole = _estep(family, params, data, np)
        cuts = hyp.draw(split_points(data.shape[0]), label="cuts")
        parts = _estep_pieces(family, params, data, cuts)
        assert_stats_allclose(combine_all(family, parts), whole, self.rtol)
        assert float(combine_all(family, parts)["n"]) == data.shape[0]

    def test_single_rows_and_uneven_pieces(self, family, params, data):
        """Pieces of 1, 1, 2, 3, 1, 17 rows and the rest (and every row alone) give the same."""
        n = data.shape[0]
        whole = _estep(family, params, data, np)
        cuts = np.cumsum([1, 1, 2, 3, 1, 17])
        assert cuts[-1] < n
        parts = _estep_pieces(family, params, data, cuts)
        assert_stats_allclose(combine_all(family, parts), whole, self.rtol)
        rows = [_estep(family, params, data[i : i + 1], np, start=i) for i in range(n)]
        assert_stats_allclose(combine_all(family, rows), whole, self.rtol)

    def test_empty_block_is_identity(self, family, params, data):
        """The statistics of a 0-row block (the engine's empty chunks) are neutral."""
        whole = _estep(family, params, data, np)
        empty = _estep(family, params, data[:0], np)
        assert float(empty["n"]) == 0.0
        assert_stats_allclose(family.combine(whole, empty), whole, 0.0)
        assert_stats_allclose(family.combine(empty, whole), whole, 0.0)

    def test_workspace_reuse(self, family, params, data):
        """One scratch ``workspace`` reused over pieces of different sizes (as the engine does
        over the sub-batches of a block) gives the statistics of fresh calls. Results may be
        views of the workspace until the next call, so each is copied before it."""
        if "workspace" not in inspect.signature(family.estep).parameters:
            pytest.skip("estep takes no workspace")
        from dmix.xp import Workspace

        n = data.shape[0]
        cuts = [n // 2, n // 2 + 1, n // 2 + 4]  # big, 1 row, 3 rows, rest
        pieces = list(zip([0, *cuts], split_rows(data, cuts), strict=True))
        ws = Workspace()
        for order in (pieces, pieces[::-1]):  # growing and shrinking buffers
            for start, piece in order:
                stats = copy.deepcopy(_estep(family, params, piece, np, workspace=ws,
                                             start=start))
                assert_stats_allclose(stats, _estep(family, params, piece, np, start=start),
                                      self.rtol)

    # 2. combine is associative and commutative --------------------------------------------

    def test_combine_associative_and_commutative(self, family, params, data):
        """(a + b) + c == a + (b + c) within rounding; a + b == b + a exactly."""
        n = data.shape[0]
        a, b, c = _estep_pieces(family, params, data, [n // 5, n // 2])
        left = family.combine(family.combine(a, b), c)
        right = family.combine(a, family.combine(b, c))
        assert_stats_allclose(left, right, 1e-13)
        assert_stats_allclose(family.combine(a, b), family.combine(b, a), 0.0)
        assert_stats_allclose(family.combine(left, a), family.combine(a, left), 0.0)

    # 3. Statistics are float64 and carry the required keys --------------------------------

    def test_stats_keys_and_dtypes(self, family, params, data):
        """Stats carry n, loglik, n_nonfinite; every value is float64; n counts the rows."""
        stats = _estep(family, params, data, np)
        missing = [key for key in REQUIRED_STATS if key not in stats]
        assert not missing, f"statistics lack the required keys {missing}"
        for key, value in stats.items():
            assert np.asarray(value).dtype == np.float64, (key, np.asarray(value).dtype)
            assert isinstance(value, float | np.ndarray | np.floating), (key, type(value))
        assert float(stats["n"]) == data.shape[0]
        assert float(stats["n_nonfinite"]) == 0.0
        assert np.isfinite(float(stats["loglik"]))

    def test_float32_data_gives_float64_stats(self, family, params, data):
        """float32 data: float64 statistics, equal to those of the float64 upcast."""
        x32 = data.astype(np.float32)
        stats32 = _estep(family, params, x32, np)
        stats64 = _estep(family, params, x32.astype(np.float64), np)
        for key, value in stats32.items():
            assert np.asarray(value).dtype == np.float64, (key, np.asarray(value).dtype)
        assert_stats_allclose(stats32, stats64, self.rtol)
        logp = family.log_density(params, x32, np)
        assert logp.dtype == np.float64
        np.testing.assert_allclose(logp, family.log_density(params, x32.astype(np.float64), np),
                                   rtol=self.rtol)

    # 4. EM does not decrease the likelihood -----------------------------------------------

    def test_em_monotone(self, unregularized_family, params, data):
        """estep + mstep, regularisation off: each value of the objective EM increases (the
        family's ``objective`` if it has one, else the mean log-likelihood) >= previous
        - 1e-9 |previous|."""
        if not self.monotone:
            pytest.skip("the family declares monotone = False")
        family = unregularized_family
        state: dict = {}
        bounds = []
        for _ in range(self.em_iterations):
            stats = _estep(family, params, data, np)
            bounds.append(family.objective(params, stats) if hasattr(family, "objective")
                          else float(stats["loglik"]) / float(stats["n"]))
            params, state = family.mstep(params, stats, state)
        bounds = np.asarray(bounds)
        assert np.all(np.isfinite(bounds)), bounds
        drops = bounds[:-1] - bounds[1:] - 1e-9 * np.abs(bounds[:-1])
        assert np.all(drops <= 0), f"lower bound decreased: {bounds}"
        assert bounds[-1] > bounds[0], "EM did not improve the likelihood from params"

    # 5. Pickling round-trips --------------------------------------------------------------

    def test_pickle_round_trip(self, family, params, data):
        """Family, params and stats survive pickle; the results are identical."""
        family2 = pickle.loads(pickle.dumps(family))
        params2 = pickle.loads(pickle.dumps(params))
        assert type(family2) is type(family)
        assert family2 == family
        _assert_params_equal(params2, params)
        stats = _estep(family, params, data, np)
        stats2 = pickle.loads(pickle.dumps(stats))
        assert_stats_allclose(stats2, stats, 0.0)
        assert_stats_allclose(_estep(family2, params2, data, np), stats, 0.0)
        new, _ = family.mstep(params, stats, {})
        new2, _ = family2.mstep(params2, stats2, {})
        _assert_params_equal(new2, new)
        np.testing.assert_array_equal(family2.log_density(params2, data, np),
                                      family.log_density(params, data, np))

    def test_mstep_keeps_params_structure(self, family, params, data):
        """The M-step returns parameters with the same keys, shapes and float64 dtype."""
        new, state = family.mstep(params, _estep(family, params, data, np), {})
        assert isinstance(state, dict)
        assert sorted(new) == sorted(params)
        for key in params:
            assert np.shape(new[key]) == np.shape(params[key]), key
            assert np.asarray(new[key]).dtype == np.float64, key
            assert np.all(np.isfinite(new[key])), key

    # 6. log_density, predict_proba and estep agree ----------------------------------------

    def test_log_density_consistent_with_predict_proba(self, family, params, data):
        """Responsibilities sum to 1, match the E-step, and re-weighting obeys Bayes' rule.

        For a mixture ``p(x) = sum_k w_k f_k(x)`` and responsibilities ``r_k = w_k f_k / p``,
        new weights ``v`` give ``log p_v(x) = log p(x) + logsumexp_k(log r_k + log v_k -
        log w_k)``: this ties ``log_density`` to ``predict_proba`` without the component
        densities.
        """
        logp = family.log_density(params, data, np)
        resp = family.predict_proba(params, data, np)
        stats = _estep(family, params, data, np)
        assert logp.shape == (data.shape[0],)
        assert resp.ndim == 2 and resp.shape[0] == data.shape[0]
        assert np.all(resp >= 0)
        np.testing.assert_allclose(resp.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        if getattr(family, "cem", False):
            # Classification EM: loglik is sum_i max_k log(w_k f_k(x_i)) = log p + log max_k r_k,
            # and the counts are those of the most probable components.
            np.testing.assert_allclose(float(stats["loglik"]),
                                       np.sum(logp + np.log(resp.max(axis=1))), rtol=1e-12)
            expected_nk = np.bincount(resp.argmax(axis=1), minlength=resp.shape[1])
        else:
            np.testing.assert_allclose(float(stats["loglik"]), logp.sum(), rtol=1e-12)
            expected_nk = resp.sum(axis=0)
        if "nk" in stats:
            np.testing.assert_allclose(stats["nk"], expected_nk, rtol=self.rtol,
                                       atol=self.rtol * data.shape[0])
        if self.weights_key is None:
            return
        w = np.asarray(params[self.weights_key], dtype=np.float64)
        v = np.random.default_rng(0).uniform(0.2, 1.0, size=w.shape)
        v /= v.sum()
        reweighted = {**params, self.weights_key: v}
        with np.errstate(divide="ignore"):
            log_ratio = np.log(resp) + np.log(v) - np.log(w)
        expected = logp + _logsumexp(log_ratio, axis=1)
        np.testing.assert_allclose(family.log_density(reweighted, data, np), expected,
                                   rtol=self.rtol, atol=self.rtol * np.max(np.abs(expected)))
        # and Bayes' rule for the new responsibilities
        expected_resp = np.exp(log_ratio + logp[:, None]
                               - family.log_density(reweighted, data, np)[:, None])
        np.testing.assert_allclose(family.predict_proba(reweighted, data, np), expected_resp,
                                   rtol=0, atol=1e-10)

    # 7. The engine: many uneven Dask chunks == one chunk ----------------------------------

    @settings(PROPERTY_SETTINGS, max_examples=8)
    @given(hyp=st.data())
    def test_engine_chunking(self, family, params, data, hyp):
        """estep_pass over many uneven Dask chunks == one chunk == estep (sync scheduler)."""
        import dask
        import dask.array as da

        from dmix.engine.loop import estep_pass

        n = data.shape[0]
        cuts = hyp.draw(split_points(n, max_pieces=24), label="cuts")
        chunks = tuple(int(c) for c in np.diff([0, *cuts, n]))
        split_every = hyp.draw(st.sampled_from([2, 3, 16]), label="split_every")
        many = da.from_array(data, chunks=(chunks, data.shape[1]))
        one = da.from_array(data, chunks=(n, data.shape[1]))
        assert many.numblocks[0] == len(cuts) + 1
        with dask.config.set(scheduler="sync"):
            stats_many = estep_pass(family, many, params, split_every=split_every)
            stats_one = estep_pass(family, one, params)
        assert_stats_allclose(stats_many, stats_one, self.rtol)
        assert_stats_allclose(stats_one, _estep(family, params, data, np), self.rtol)

    def test_checkpoint_round_trip(self, family, params, data, tmp_path):
        """EM stopped after a checkpoint and resumed from it ends bit for bit where an
        uninterrupted run ends (params and M-step state go through Zarr and back)."""
        import dask
        import dask.array as da

        from dmix.engine.loop import fit_em
        from dmix.io.checkpoint import CheckpointDir

        x = da.from_array(data, chunks=(max(1, data.shape[0] // 3), data.shape[1]))
        iters = self.em_iterations
        with dask.config.set(scheduler="sync"), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: never converges
            whole = fit_em(family, x, lambda i: params, max_iter=iters, tol=0.0)
            ckpt = CheckpointDir(tmp_path / "ckpt", keep=iters + 1)
            fit_em(family, x, lambda i: params, max_iter=iters // 2, tol=0.0, checkpoint=ckpt)
            loaded = CheckpointDir(tmp_path / "ckpt").load()
            assert loaded.snapshot.run.n_iter == iters // 2
            resumed = fit_em(family, x, lambda i: params, max_iter=iters, tol=0.0,
                             resume=loaded.snapshot)
        _assert_params_equal(resumed.params, whole.params)
        assert resumed.lower_bounds == whole.lower_bounds
        assert resumed.n_iter == whole.n_iter == iters

    # 8. Sampling and counting -------------------------------------------------------------

    def test_sample_shapes(self, family, params, data):
        """sample(params, n, rng) gives float rows of the data's width and valid labels."""
        x, labels = family.sample(params, 50, np.random.default_rng(0))
        assert x.shape == (50, data.shape[1])
        assert x.dtype == np.float64 and np.all(np.isfinite(x))
        assert labels.shape == (50,)
        assert np.issubdtype(labels.dtype, np.integer)
        n_components = np.shape(params[self.weights_key])[0] if self.weights_key else None
        assert labels.min() >= 0
        if n_components is not None:
            assert labels.max() < n_components
        x2, labels2 = family.sample(params, 50, np.random.default_rng(0))
        np.testing.assert_array_equal(x2, x)
        np.testing.assert_array_equal(labels2, labels)

    def test_counts_are_positive_ints(self, family, params, data):
        """n_parameters and temp_bytes_per_row are positive ints."""
        p = family.n_parameters(params)
        assert isinstance(p, int | np.integer) and p > 0
        n_components = np.shape(params[self.weights_key])[0] if self.weights_key else 1
        t = family.temp_bytes_per_row(data.shape[1], n_components)
        assert isinstance(t, int | np.integer) and t > 0
