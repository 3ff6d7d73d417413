"""dmix.io.model: saving and loading fitted estimators."""

import json
import os
import uuid

import numpy as np
import pytest
import zarr

import dmix.io.model as model_io
from dmix import COVARIANCE_TYPES, GaussianMixture
from dmix.errors import DmixError, InvalidParameterError, NotFittedError
from dmix.io.model import MODEL_SCHEMA, load_model, save_model

FITTED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_",
          "converged_", "n_iter_", "lower_bound_", "lower_bounds_", "n_features_in_")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(c, [1.0, 0.5, 2.0], (100, 3)) for c in (-4, 0, 4)])


@pytest.fixture(scope="module")
def models(data):
    return {ct: GaussianMixture(n_components=3, covariance_type=ct, random_state=0).fit(data)
            for ct in COVARIANCE_TYPES}


def _attrs(path):
    return dict(zarr.open_group(store=str(path), mode="r").attrs)


def _set_attrs(path, **changes):
    meta = os.path.join(path, "zarr.json")
    with open(meta) as f:
        doc = json.load(f)
    doc["attributes"].update(changes)
    with open(meta, "w") as f:
        json.dump(doc, f)


def _assert_same(a, b, data):
    for name in FITTED:
        va, vb = getattr(a, name), getattr(b, name)
        if type(va) in (bool, int, float, list):
            assert type(va) is type(vb), name
        else:  # a 0-d tied_spherical value may be a NumPy scalar or a 0-d array
            assert np.shape(va) == np.shape(vb) and np.result_type(va) == np.result_type(vb)
        np.testing.assert_array_equal(va, vb, err_msg=name)
    assert a.get_params() == b.get_params()
    np.testing.assert_array_equal(a.predict(data), b.predict(data))
    np.testing.assert_array_equal(a.predict_proba(data), b.predict_proba(data))
    np.testing.assert_array_equal(a.score_samples(data), b.score_samples(data))
    for xa, xb in zip(a.sample(50), b.sample(50), strict=True):
        np.testing.assert_array_equal(xa, xb)
    assert a.bic(data) == b.bic(data)


@pytest.mark.parametrize("cov_type", list(COVARIANCE_TYPES))
def test_round_trip(tmp_path, models, data, cov_type):
    est = models[cov_type]
    path = tmp_path / "model.zarr"
    save_model(est, path)
    assert os.listdir(tmp_path) == ["model.zarr"]  # no temporary sibling left
    loaded = load_model(path)
    assert type(loaded) is GaussianMixture and loaded.client is None
    _assert_same(est, loaded, data)

    attrs = _attrs(path)
    assert attrs["schema"] == MODEL_SCHEMA and attrs["complete"] is True
    assert attrs["estimator"] == "GaussianMixture"
    assert {k: attrs["family"][k] for k in ("name", "covariance_type", "reg_covar")} == {
        "name": "gaussian", "covariance_type": cov_type, "reg_covar": 1e-6}
    assert sorted(attrs["checksums"]) == [f"params/{k}" for k in (
        "covariances", "means", "precisions_cholesky", "weights")]
    assert {"dmix", "numpy", "zarr"} <= attrs["versions"].keys()
    assert "client" not in attrs["settings"]
    group = zarr.open_group(store=str(path), mode="r")
    assert group["params/covariances"].shape == est.covariances_.shape
    assert group["params/weights"].dtype == np.float64


def test_round_trip_through_a_url(models, data):
    url = f"memory://dmix-tests/model-{uuid.uuid4().hex}"
    save_model(models["diag"], url)
    _assert_same(models["diag"], load_model(url), data)
    with pytest.raises(DmixError, match="overwrite=True"):
        save_model(models["full"], url)
    save_model(models["full"], url, overwrite=True)
    assert load_model(url).covariance_type == "full"


def test_overwrite(tmp_path, models):
    path = tmp_path / "m.zarr"
    save_model(models["full"], path)
    with pytest.raises(DmixError, match=r"m\.zarr.*overwrite=True"):
        save_model(models["diag"], path)
    assert load_model(path).covariance_type == "full"
    save_model(models["diag"], path, overwrite=True)
    assert load_model(path).covariance_type == "diag"
    assert os.listdir(tmp_path) == ["m.zarr"]  # the replaced model is gone

    other = tmp_path / "other.zarr"
    zarr.open_group(store=str(other), mode="w").create_array("x", data=np.zeros(3))
    with pytest.raises(DmixError, match="not a dmix model"):
        save_model(models["full"], other, overwrite=True)
    (tmp_path / "empty").mkdir()
    save_model(models["full"], tmp_path / "empty")  # an empty directory is no model
    assert load_model(tmp_path / "empty").covariance_type == "full"


def test_interrupted_save_leaves_nothing(tmp_path, models, monkeypatch):
    def crash(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_io, "_fsync_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(models["full"], tmp_path / "m.zarr")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("array", ["params/means", "params/precisions_cholesky"])
def test_corrupted_array(tmp_path, models, array):
    path = tmp_path / "m.zarr"
    save_model(models["full"], path)
    (chunk,) = [p for p in (path / array).rglob("*") if p.is_file() and p.name != "zarr.json"]
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(DmixError, match=f"corrupt.*{array}.*checksum"):
        load_model(path)
    chunk.write_bytes(bytes(raw[:5]))  # truncated: unreadable
    with pytest.raises(DmixError, match=f"corrupt.*{array}"):
        load_model(path)


def test_wrong_schema_and_incomplete(tmp_path, models):
    path = tmp_path / "m.zarr"
    save_model(models["tied"], path)
    _set_attrs(path, schema="dmix-model/99")
    with pytest.raises(DmixError, match=r"'dmix-model/99', not 'dmix-model/1'"):
        load_model(path)
    _set_attrs(path, schema=MODEL_SCHEMA, complete=False)
    with pytest.raises(DmixError, match="incomplete"):
        load_model(path)
    _set_attrs(path, complete=True, estimator="KMeans")
    with pytest.raises(DmixError, match="'KMeans'"):
        load_model(path)
    with pytest.raises(DmixError, match="does not exist"):
        load_model(tmp_path / "missing.zarr")


def test_settings_with_arrays(tmp_path, data):
    means = np.array([[-4.0, -4, -4], [0, 0, 0], [4, 4, 4]])
    est = GaussianMixture(3, covariance_type="tied_diag", means_init=means,
                          precisions_init=np.ones(3), dtype=np.float64, random_state=1,
                          max_iter=5).fit(data)
    path = tmp_path / "m.zarr"
    save_model(est, path)
    attrs = _attrs(path)
    assert attrs["settings_arrays"] == ["means_init", "precisions_init"]
    assert attrs["settings"]["dtype"] == "float64"
    assert "settings/means_init" in attrs["checksums"]
    loaded = load_model(path)
    assert isinstance(loaded.means_init, np.ndarray)
    np.testing.assert_array_equal(loaded.means_init, means)
    np.testing.assert_array_equal(loaded.precisions_init, np.ones(3))
    np.testing.assert_array_equal(loaded.score_samples(data), est.score_samples(data))
    # The settings are those of the fit: fitting the loaded estimator again gives the same.
    np.testing.assert_array_equal(loaded.fit(data).means_, est.means_)


def test_what_cannot_be_saved(tmp_path, models):
    with pytest.raises(NotFittedError, match="not fitted"):
        save_model(GaussianMixture(2), tmp_path / "a.zarr")
    est = GaussianMixture(3, random_state=0)
    est.__dict__.update({k: v for k, v in vars(models["full"]).items() if k.endswith("_")})
    est.means_init = lambda: None
    with pytest.raises(InvalidParameterError, match="'means_init'.*callable"):
        save_model(est, tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()

    est.means_init = None
    est.random_state = np.random.RandomState(0)
    with pytest.warns(UserWarning, match="random_state"):
        save_model(est, tmp_path / "c.zarr")
    assert load_model(tmp_path / "c.zarr").random_state is None


def test_non_finite_lower_bound(tmp_path, models):
    est = GaussianMixture(3, covariance_type="spherical", random_state=0)
    est.__dict__.update({k: v for k, v in vars(models["spherical"]).items()
                         if k.endswith("_")})
    est.lower_bound_, est.lower_bounds_ = -np.inf, []
    save_model(est, tmp_path / "m.zarr")
    loaded = load_model(tmp_path / "m.zarr")
    assert loaded.lower_bound_ == -np.inf and loaded.lower_bounds_ == []


def test_interrupted_save_to_a_url_is_incomplete(models, monkeypatch):
    url = f"memory://dmix-tests/model-{uuid.uuid4().hex}"

    def crash(group, arrays):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(model_io, "_write", crash)
        with pytest.raises(KeyboardInterrupt):
            save_model(models["full"], url)
    with pytest.raises(DmixError, match="incomplete"):
        load_model(url)
    save_model(models["full"], url, overwrite=True)  # the debris may be replaced
    assert load_model(url).covariance_type == "full"
