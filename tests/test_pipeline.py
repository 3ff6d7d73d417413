"""``dmix run PIPELINE.toml``: the shipped pipelines at small sizes, the file's errors, ingest."""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
import pytest
import zarr

import dmix
from dmix.cli import main
from dmix.io.ingest import ingest
from dmix.pipeline import PipelineError, load_pipeline, run_pipeline

PIPELINES = pathlib.Path(__file__).resolve().parents[1] / "pipelines"


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def _check_outputs(info: dict, data: str, n: int):
    """The saved model loads, scores as the summary says, and the Zarr outputs are its
    predict / score_samples."""
    x = zarr.open_group(data, mode="r")["X"][:]
    assert x.shape[0] == n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dmix.load(info["model"])
    assert model.score(x) == pytest.approx(info["score"], rel=1e-10)
    labels = zarr.open_group(info["labels"], mode="r")["labels"][:]
    scores = zarr.open_group(info["scores"], mode="r")["log_density"][:]
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert scores.shape == (n,) and scores.dtype == np.float64
    np.testing.assert_array_equal(labels, model.predict(x))
    np.testing.assert_allclose(scores, model.score_samples(x), rtol=1e-10)
    assert scores.mean() == pytest.approx(info["score"], rel=1e-10)
    assert sum(info["counts"]) == n
    return model, x


# -- the shipped pipelines --------------------------------------------------------------------


def test_quickstart_runs_on_its_own_local_cluster(tmp_path, capsys):
    """Through the CLI, with the [cluster] section: a real LocalCluster of processes."""
    status = main(["run", str(PIPELINES / "quickstart.toml"), "--set", "data.n_samples=4000",
                   "--set", "data.chunk_size=500", "--set", "cluster.n_workers=2",
                   "--set", "cluster.dashboard_address=:0",
                   "--set", f"outputs.directory={tmp_path}"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "[cluster] local: 2 worker(s)" in out and "[fit] gmm" in out
    # Fit again through the API on the same settings: the data store is reused.
    summary = run_pipeline(PIPELINES / "quickstart.toml",
                           ["data.n_samples=4000", "data.chunk_size=500", "cluster.n_workers=2",
                            "cluster.dashboard_address=':0'", f"outputs.directory={tmp_path}"])
    assert summary["data"]["reused"] and summary["data"]["n_samples"] == 4000
    info = summary["models"]["gmm"]
    model, x = _check_outputs(info, str(tmp_path / "data.zarr"), 4000)
    assert info["n_components"] == 4 and model.means_.shape == (4, 8)
    assert info["lower_bound"] == pytest.approx(info["score"], abs=1e-2)
    assert summary["report"] == str(tmp_path / "report.html")
    if summary["report_status"] == "written":  # dmix.report is there (else "skipped: ...")
        assert "<html" in (tmp_path / "report.html").read_text().lower()


def test_donut_compares_models_on_held_out_rows(tmp_path, client):
    summary = run_pipeline(PIPELINES / "donut.toml",
                           ["data.n_samples=1500", "data.chunk_size=500", "model.chunk_size=1000",
                            "model.squared.n_init=1", "model.squared.max_iter=40",
                            f"outputs.directory={tmp_path}"], client=client)
    assert summary["data"]["n_fit"] == 1000 and summary["data"]["n_holdout"] == 500
    assert set(summary["models"]) == {"squared", "gmm"}
    x = zarr.open_group(str(tmp_path / "data.zarr"), mode="r")["X"][:]
    for label, info in summary["models"].items():
        assert info["model"] == str(tmp_path / label / "model")
        model, _ = _check_outputs(info, str(tmp_path / "data.zarr"), 1500)
        assert model.score(x[1000:]) == pytest.approx(info["holdout_score"], rel=1e-10)
    assert summary["models"]["squared"]["estimator"] == "SquaredGaussianMixture"
    scores = {k: v["holdout_score"] for k, v in summary["models"].items()}
    assert summary["best"] == max(scores, key=scores.get)
    assert summary["compared_on"] == "holdout"


def test_model_selection_picks_by_bic(tmp_path, client):
    summary = run_pipeline(PIPELINES / "model-selection.toml",
                           ["data.n_samples=3000", "data.chunk_size=1000",
                            "selection.n_components=[1, 2, 3, 4]",
                            "selection.covariance_types=['full', 'spherical']",
                            "model.n_init=1", f"outputs.directory={tmp_path}"], client=client)
    table = summary["selection"]["table"]
    assert len(table) == 8
    best = min(table, key=lambda row: row["bic"])
    assert summary["selection"]["best"] == {"n_components": best["n_components"],
                                            "covariance_type": best["covariance_type"]}
    assert best["n_components"] == 3  # the data's own number of components
    model, x = _check_outputs(summary["models"]["gmm"], str(tmp_path / "data.zarr"), 3000)
    assert model.bic(x) == pytest.approx(best["bic"], rel=1e-9)


def test_larger_than_memory_streams_and_resumes(tmp_path, client):
    sets = ["data.n_samples=6000", "data.chunk_size=1000", "model.max_iter=1",
            f"checkpoint.directory={tmp_path / 'ckpt'}", f"outputs.directory={tmp_path}"]
    p = load_pipeline(PIPELINES / "larger-than-memory.toml", sets)
    assert p.models[0]["options"]["persist"] is False
    assert p.cluster["memory_limit"] == "512MiB"
    first = run_pipeline(p, client=client)
    assert list((tmp_path / "ckpt").iterdir())
    _check_outputs(first["models"]["gmm"], str(tmp_path / "data.zarr"), 6000)
    assert first["models"]["gmm"]["n_iter"] == 1
    # resume = true continues the checkpoints: with more iterations allowed, it goes on.
    again = run_pipeline(PIPELINES / "larger-than-memory.toml", [*sets, "model.max_iter=20"],
                         client=client)
    assert again["data"]["reused"]
    assert again["models"]["gmm"]["n_iter"] > 1
    assert again["models"]["gmm"]["iterations_run"] == again["models"]["gmm"]["n_iter"] - 1
    assert again["models"]["gmm"]["lower_bound"] >= first["models"]["gmm"]["lower_bound"]
    # ... exactly as a run that was never interrupted (its own checkpoints and outputs).
    whole = run_pipeline(PIPELINES / "larger-than-memory.toml", [
        *sets[:3], "model.max_iter=20", f"checkpoint.directory={tmp_path / 'ckpt-whole'}",
        f"outputs.directory={tmp_path / 'whole'}"], client=client)
    assert whole["models"]["gmm"]["iterations_run"] == whole["models"]["gmm"]["n_iter"]
    for key in ("n_iter", "lower_bound", "converged"):
        assert again["models"]["gmm"][key] == whole["models"]["gmm"][key], key


def test_zarr_url_and_a_scheduler_address(tmp_path, client):
    """[data] path as an fsspec URL with its own array name; [cluster] address: the run
    connects to that scheduler and fits what the library fits on the same rows."""
    from dmix.datasets import make_mixture

    x = make_mixture(3000, 3, 3, seed=4).rows(0, 3000)
    zarr.open_group(str(tmp_path / "d.zarr"), mode="w").create_array(
        "Y", data=x, chunks=(500, 3))
    text = (f"[data]\npath = 'file://{tmp_path / 'd.zarr'}'\narray = 'Y'\n"
            "[model]\nname = 'gmm'\nn_components = 3\nrandom_state = 0\n"
            f"[cluster]\naddress = '{client.scheduler.address}'\n"
            f"[outputs]\ndirectory = '{tmp_path / 'out'}'\nreport = false\n")
    summary = run_pipeline(text)
    assert summary["cluster"]["kind"] == "address" and summary["cluster"]["n_workers"] == 2
    assert summary["data"]["n_samples"] == 3000 and summary["data"]["n_features"] == 3
    info = summary["models"]["gmm"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = dmix.GaussianMixture(3, random_state=0, chunk_size=500).fit(x)
    assert info["lower_bound"] == pytest.approx(local.lower_bound_, rel=1e-10)
    np.testing.assert_allclose(dmix.load(info["model"]).means_, local.means_, rtol=1e-9)
    labels = zarr.open_group(info["labels"], mode="r")["labels"][:]
    np.testing.assert_array_equal(labels, local.predict(x))


# -- errors in the file -----------------------------------------------------------------------


BASE = """\
[data]
generate = "mixture"
n_samples = 1000

[model]
name = "gmm"
n_components = 2
"""


def test_unknown_key_names_it_its_line_and_the_valid_keys():
    text = BASE + "n_component = 3\n"
    with pytest.raises(PipelineError, match=r"line 8: unknown key 'n_component' in \[model\]"
                                            r"\. Did you mean 'n_components'\?") as err:
        load_pipeline(text)
    assert "covariance_type" in str(err.value) and "label" in str(err.value)
    with pytest.raises(PipelineError, match=r"line 3: unknown key 'n_sample'.*n_samples"):
        load_pipeline(BASE.replace("n_samples", "n_sample"))
    with pytest.raises(PipelineError, match=r"line 9: unknown section 'clutser'.*cluster"):
        load_pipeline(BASE + "\n[clutser]\nn_workers = 2\n")


def test_wrong_types_and_values_name_the_key_and_line():
    with pytest.raises(PipelineError, match=r"line 3: \[data\] n_samples must be an integer; "
                                            r"got '1000' \(str\)"):
        load_pipeline(BASE.replace("1000", '"1000"'))
    with pytest.raises(PipelineError, match=r"line 2: \[data\] generate = 'blobs' is not one "
                                            r"of mixture, shape"):
        load_pipeline(BASE.replace('"mixture"', '"blobs"'))
    # Estimator option values are checked by the estimator, with the key's line.
    with pytest.raises(PipelineError, match=r"line 8: \[model\] gmm: .*'tol'"):
        run_pipeline(BASE + "tol = -1.0\n", dry_run=True)
    with pytest.raises(PipelineError, match=r"--set model.n_init=0: \[model\] gmm: .*n_init"):
        run_pipeline(BASE, ["model.n_init=0"], dry_run=True)
    with pytest.raises(PipelineError, match=r"line 8: \[model\] client cannot be set here"):
        load_pipeline(BASE + 'client = "x"\n')


def test_missing_required_says_which():
    with pytest.raises(PipelineError, match=r"required section \[model\] is missing"):
        load_pipeline("[data]\npath = 'x.zarr'\n")
    with pytest.raises(PipelineError, match=r"line 5: \[model\] is missing the required key "
                                            r"'name'"):
        load_pipeline(BASE.replace('name = "gmm"', 'covariance_type = "full"'))
    with pytest.raises(PipelineError, match=r"exactly one of generate, path or ingest; got "
                                            r"generate, path"):
        load_pipeline(BASE.replace("n_samples = 1000", "path = 'x.zarr'"))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    status = main(["run", str(PIPELINES / "donut.toml"), "--dry-run",
                   "--set", f"outputs.directory={tmp_path}"])
    out = capsys.readouterr().out
    assert status == 0
    assert "generate the 2-D shape 'donut': 6000 rows" in out
    assert "squared: SquaredGaussianMixture(" in out and "gmm: GaussianMixture(" in out
    assert list(tmp_path.iterdir()) == []
    assert main(["run", str(PIPELINES / "donut.toml"), "--dry-run", "--set",
                 "model.squared.n_inits=2"]) == 1
    assert "--set model.squared.n_inits=2" in capsys.readouterr().err


# -- ingest -----------------------------------------------------------------------------------


@pytest.fixture
def table():
    return np.random.default_rng(0).normal(size=(1037, 3))


def test_ingest_npy_in_blocks(tmp_path, table):
    np.save(tmp_path / "a.npy", table[:500])
    np.save(tmp_path / "b.npy", table[500:])
    x = ingest(str(tmp_path / "*.npy"), str(tmp_path / "out.zarr"), chunk_size=100)
    assert x.chunks == (100, 3)
    np.testing.assert_array_equal(x[:], table)


def test_ingest_csv_with_header_and_columns(tmp_path, table):
    path = tmp_path / "t.csv"
    np.savetxt(path, table, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    x = ingest(str(path), str(tmp_path / "out.zarr"), chunk_size=64)
    np.testing.assert_array_equal(x[:], table)
    y = ingest(str(path), str(tmp_path / "out2.zarr"), columns=["c", "a"], dtype="float32")
    np.testing.assert_array_equal(y[:], table[:, [2, 0]].astype(np.float32))


def test_ingest_parquet(tmp_path, table):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"a": table[:, 0], "b": table[:, 1], "c": table[:, 2]}),
                   tmp_path / "t.parquet", row_group_size=300)
    x = ingest(str(tmp_path / "t.parquet"), str(tmp_path / "out.zarr"), chunk_size=128)
    np.testing.assert_array_equal(x[:], table)


def test_pipeline_ingests_then_fits(tmp_path, table, client):
    np.savetxt(tmp_path / "t.csv", table, delimiter=",", fmt="%.17g")
    text = (f"[data]\ningest = '{tmp_path / 't.csv'}'\nchunk_size = 200\n"
            "[model]\nname = 'gmm'\nn_components = 1\n"
            f"[outputs]\ndirectory = '{tmp_path / 'out'}'\nreport = false\nlabels = false\n")
    summary = run_pipeline(text, client=client)
    stored = zarr.open_group(str(tmp_path / "out" / "data.zarr"), mode="r")["X"][:]
    np.testing.assert_array_equal(stored, table)
    mean = np.mean(table, axis=0)
    model = dmix.load(summary["models"]["gmm"]["model"])
    np.testing.assert_allclose(model.means_[0], mean, atol=1e-12)
    assert summary["models"]["gmm"]["labels"] is None
