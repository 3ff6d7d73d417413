"""Every mixture estimator gets the same engine features: fits that do not depend on the
chunking, EM that never lowers the bound, exact resume from checkpoints, save and load,
criteria, sampling, the shared options (annealing, var_regularization, stopping criteria,
restarts), a real cluster reading Zarr from disk, and ``dmix fit --model``."""

import re
import warnings

import dask.array as da
import distributed
import numpy as np
import pytest
import zarr

import dmix
from dmix.cli import main as cli_main
from dmix.engine.loop import History
from dmix.engine.stopping import FitHistory, get_criterion


def _blobs(d=3, seed=5):
    """Three skewed, elongated clusters in ``d`` dimensions, 900 rows."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0] * d, [5.0] + [1.0] * (d - 1), [1.0] + [6.0] * (d - 1)])
    parts = []
    for j, c in enumerate(centers):
        z = rng.normal(size=(300, d)) * np.linspace(1.0, 0.5, d)
        z[:, 0] += (j - 1) * np.abs(rng.normal(size=300))  # some skew
        parts.append(c + z)
    x = np.concatenate(parts)
    rng.shuffle(x)
    return x


X = _blobs()
#: The unrestricted skew-normal E-step integrates a D-variate normal per row: exact and fast for
#: D = 2, a lattice rule 60 times slower for D = 3 (tested in families/test_skew_normal.py).
X2 = np.ascontiguousarray(X[:, :2])

#: (id, estimator class name, options for a quick 3-cluster fit, CLI --model arguments)
CASES = [
    ("gmm", "GaussianMixture", dict(covariance_type="full"), ["--model", "gmm"]),
    ("skew", "SkewNormalMixture", dict(form="restricted"), ["--model", "skew"]),
    ("skew-unrestricted-2d", "SkewNormalMixture", dict(form="unrestricted"),
     ["--model", "skew", "--skew-form", "unrestricted"]),
    ("dgmm", "DeepGaussianMixture", dict(layer_sizes=(3, 2), layer_dims=(2, 1)),
     ["--model", "dgmm", "--layer-sizes", "3,2", "--layer-dims", "2,1"]),
    ("gmn", "GaussianMixtureNetwork", dict(layer_sizes=(3, 2), layer_dims=(2, 1)),
     ["--model", "gmn", "--layer-sizes", "3,2", "--layer-dims", "2,1"]),
    ("squared", "SquaredGaussianMixture", dict(covariance_type="full", learning_rate=0.03),
     ["--model", "squared", "--learning-rate", "0.03"]),
]

#: Estimators trained by gradients: no EM monotonicity, no annealing or var_regularization.
GRADIENT = {"SquaredGaussianMixture"}


def _make(name, **options):
    if "layer_sizes" in options:  # the deep models: n_components is layer_sizes[0]
        assert options.pop("n_components") == options["layer_sizes"][0]
    return getattr(dmix, name)(**options)


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


def _data(case):
    return X2 if case[0].endswith("-2d") else X


def _fit(case, x=None, **options):
    _, name, own, _ = case
    x = _data(case) if x is None else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _make(name, n_components=3, random_state=0, **own, **options).fit(x)


def _as_json(params):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def _assert_same_model(a, b, rtol):
    pa, pb = a._params, b._params
    assert set(pa) == set(pb)
    for key in pa:
        np.testing.assert_allclose(pa[key], pb[key], rtol=rtol, atol=0 if rtol == 0 else 1e-12,
                                   err_msg=key)


def test_fit_does_not_depend_on_the_chunking(case):
    x = _data(case)
    a = _fit(case, x=x, chunk_size=97, max_iter=15, tol=0.0)
    b = _fit(case, x=da.from_array(x, chunks=(250, x.shape[1])), max_iter=15, tol=0.0)
    _assert_same_model(a, b, rtol=1e-8)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-12)


def test_em_never_lowers_the_bound_and_predictions_are_consistent(case):
    x = _data(case)
    model = _fit(case, max_iter=40, tol=0.0)
    bounds = np.array(model.lower_bounds_)
    if case[1] in GRADIENT:
        # Gradient steps may overshoot (here the start is within 1e-3 of a local optimum);
        # a full-batch fit keeps the best parameters it evaluated.
        assert model.lower_bound_ == bounds.max() >= bounds[0]
        assert model.score(x) == pytest.approx(model.lower_bound_, rel=1e-12)
        bounds = np.maximum.accumulate(bounds)
    elif case[1] == "SkewNormalMixture":
        # The first M-step leaves zero skewness (a stationary point of EM) by a moment start,
        # which may lower the bound; EM proper follows.
        bounds = bounds[1:]
    assert np.all(np.diff(bounds) >= -1e-10 * np.abs(bounds[1:]))
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model.predict(x), proba.argmax(axis=1))
    assert model.score(x) == pytest.approx(model.score_samples(x).mean(), rel=1e-12)
    n, p = len(x), model._n_parameters()
    assert model.bic(x) == pytest.approx(-2 * model.score(x) * n + p * np.log(n), rel=1e-12)
    assert model.aic(x) == pytest.approx(-2 * model.score(x) * n + 2 * p, rel=1e-12)


def test_resume_equals_the_uninterrupted_fit(case, tmp_path):
    x = _data(case)
    full = _fit(case, max_iter=8, tol=0.0)
    _fit(case, max_iter=3, tol=0.0, checkpoint=tmp_path / "c")
    resumed = dmix.resume(tmp_path / "c", x, max_iter=8)
    assert type(resumed) is type(full)
    _assert_same_model(resumed, full, rtol=0)
    assert resumed.lower_bounds_ == full.lower_bounds_


def test_save_and_load_give_the_same_model(case, tmp_path):
    x = _data(case)
    model = _fit(case, max_iter=10)
    model.save(tmp_path / "m")
    loaded = dmix.load(tmp_path / "m")
    assert type(loaded) is type(model)
    _assert_same_model(loaded, model, rtol=0)
    np.testing.assert_array_equal(loaded.score_samples(x), model.score_samples(x))
    # as saved in JSON: tuples come back as lists
    assert loaded.get_params() == {**_as_json(model.get_params()), "client": None}


def test_sampling_is_reproducible_and_follows_the_model(case):
    x = _data(case)
    model = _fit(case, max_iter=30)
    x1, y1 = model.sample(4000)
    x2, y2 = model.sample(4000)
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (4000, x.shape[1]) and y1.shape == (4000,)
    assert set(np.unique(y1)) <= set(range(3))
    # Samples score like the data the model fits (their mean log-density is the model's
    # negative entropy, estimated on 4000 draws: sd about 0.03 here).
    assert model.score(x1) == pytest.approx(model.score(x), abs=0.15)


def test_shared_options(case):
    x = _data(case)
    if case[1] in GRADIENT:
        _shared_gradient_options(case, x)
        return
    history = History()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, name, own, _ = case
        annealed = _make(name, n_components=3, random_state=0, annealing=True,
                         annealing_start=0.3, annealing_iter=6, max_iter=30, tol=0.0,
                         **own).fit(x, monitor=history)
    nus = [r.inverse_temperature for r in history.records]
    np.testing.assert_allclose(nus[:6], 0.3 ** (1 - np.arange(6) / 6), rtol=1e-15)
    assert nus[6:] == [1.0] * (len(nus) - 6)
    # From the second plain iteration on (the third for skew-normal, after its moment
    # start) it is EM: the bound does not fall, and the final parameters score no lower.
    plain_bounds = np.array(annealed.lower_bounds_[8:])
    assert plain_bounds.size > 5
    assert np.all(np.diff(plain_bounds) >= -1e-10 * np.abs(plain_bounds[1:]))
    assert annealed.score(x) >= annealed.lower_bound_ - 1e-10 * abs(annealed.lower_bound_)
    _assert_criterion_and_restarts(case, tol=1e-5)
    plain = _fit(case, max_iter=5, tol=0.0)
    regularized = _fit(case, max_iter=5, tol=0.0, var_regularization=0.5)
    assert regularized.score(x) < plain.score(x)


def _assert_criterion_and_restarts(case, tol):
    """The run stops exactly where the criterion first holds on its bounds; restart 0 of
    three side by side is the fit with n_init=1, so the best of three is no worse."""
    relative = _fit(case, stopping_criterion="relative", tol=tol, max_iter=300)
    criterion, bounds = get_criterion("relative"), relative.lower_bounds_
    assert relative.converged_ and relative.n_iter_ < 300
    held = [criterion(FitHistory(bounds[:t], [0.0] * t, tol)) for t in range(2, len(bounds) + 1)]
    assert held[-1] and not any(held[:-1])
    first = _fit(case, n_init=1, max_iter=30)
    best = _fit(case, n_init=3, max_iter=30)
    assert best.lower_bound_ >= first.lower_bound_


def _shared_gradient_options(case, x):
    """What gradient training shares with EM: stopping criteria and restarts."""
    _assert_criterion_and_restarts(case, tol=1e-4)
    with pytest.raises(TypeError, match="annealing"):  # no EM-only options
        _make(case[1], n_components=3, annealing=True)


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    paths = {}
    for value in (X, X2):
        path = tmp_path_factory.mktemp("families") / f"x{value.shape[1]}.zarr"
        arr = zarr.create_array(path, shape=value.shape, chunks=(200, value.shape[1]),
                                dtype="f8")
        arr[:] = value
        paths[value.shape[1]] = str(path)
    return paths


def test_on_a_cluster_from_zarr_equals_in_process(case, client, stores):
    x = _data(case)
    local = _fit(case, chunk_size=200, max_iter=10, tol=0.0)
    store = stores[x.shape[1]]
    remote = _fit(case, x=store, chunk_size=200, max_iter=10, tol=0.0, client=client)
    _assert_same_model(remote, local, rtol=1e-10)


def test_cli_fit_model(case, client, stores, tmp_path, capsys):
    x = _data(case)
    _, name, own, model_args = case
    store = stores[x.shape[1]]
    out = tmp_path / "model"
    code = cli_main(["fit", store, "-k", "3", "--seed", "0", "--max-iter", "10", "--tol", "0",
                     "--scheduler", client.scheduler.address, "--output", str(out), *model_args])
    assert code == 0
    loaded = dmix.load(out)
    assert type(loaded).__name__ == name
    expected = _fit(case, x=store, max_iter=10, tol=0.0, chunk_size=200)
    _assert_same_model(loaded, expected, rtol=1e-10)
    address = ["--scheduler", client.scheduler.address]
    for command in (["score", store], ["predict", store, "--proba"],
                    ["sample", "--n-samples", "500", "--seed", "3", "--chunk-size", "128"]):
        assert cli_main([*command, "--model", str(out), "--output",
                         str(tmp_path / command[0]), *address]) == 0
    scores = zarr.open_group(tmp_path / "score", mode="r")
    np.testing.assert_allclose(scores["log_density"][:], expected.score_samples(x), rtol=1e-10)
    predicted = zarr.open_group(tmp_path / "predict", mode="r")
    np.testing.assert_allclose(predicted["proba"][:], expected.predict_proba(x), rtol=1e-8,
                               atol=1e-12)
    np.testing.assert_array_equal(predicted["labels"][:], expected.predict(x))
    drawn = zarr.open_group(tmp_path / "sample", mode="r")
    assert drawn["X"].shape == (500, x.shape[1]) and drawn["labels"].shape == (500,)
    assert abs(expected.score(drawn["X"][:]) - expected.score(x)) < 0.4
    # dmix info: the clusters' weights and means, whatever the family's parameters are.
    capsys.readouterr()
    assert cli_main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert re.search(r"n_components\s+3\n", info)
    assert re.search(rf"n_features\s+{x.shape[1]}\n", info)
    rows = re.findall(r"^\s+(\d+)\s+(-?[\d.]+)\s+([\d.]+)\s", info.split("Components")[1], re.M)
    assert sorted(int(j) for j, _, _ in rows) == [0, 1, 2]
    for j, weight, norm in rows:
        assert float(weight) == pytest.approx(loaded.weights_[int(j)], abs=5e-5)
        assert float(norm) == pytest.approx(np.linalg.norm(loaded.means_[int(j)]), abs=5e-5)


def test_integer_sample_weights_fit_as_repeated_rows(case):
    x = _data(case)
    w = np.random.default_rng(2).integers(0, 3, size=len(x))
    # Initialisation ignores weights: both fits warm-start from the same parameters.
    _, name, own, _ = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = _make(name, n_components=3, random_state=0, max_iter=0, **own).fit(x)
        repeated = np.repeat(x, w, axis=0)
        a = _make(name, n_components=3, warm_start=True, max_iter=6, tol=0.0, **own)
        a.__dict__.update({k: v for k, v in start.__dict__.items() if k.endswith("_")})
        a.fit(x, sample_weight=w.astype(float))
        b = _make(name, n_components=3, warm_start=True, max_iter=6, tol=0.0, **own)
        b.__dict__.update({k: v for k, v in start.__dict__.items() if k.endswith("_")})
        b.fit(repeated)
    _assert_same_model(a, b, rtol=1e-9)
