"""The pipeline file: its schema as plain data, parsing, ``--set`` overrides and validation.

A pipeline is a TOML file of sections (tables) whose keys are checked against :data:`SCHEMA`:
each key has a type, a default (``None``: unset) and, where it has them, choices or a lower
bound. ``[model]`` also takes the constructor parameters of its estimator, and may be written
``[[model]]`` several times to compare models. Errors name the key, its line in the file and
the valid names; :mod:`tomllib` gives no positions, so the line is found by scanning the file.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field

from dmix.errors import InvalidParameterError

__all__ = ["SCHEMA", "Pipeline", "PipelineError", "load_pipeline", "parse_set"]


class PipelineError(InvalidParameterError):
    """A pipeline file that does not follow :data:`SCHEMA`."""


def _key(type_, default=None, doc="", choices=None, low=None, required=False):
    return {"type": type_, "default": default, "choices": choices, "low": low,
            "required": required, "doc": doc}


#: The sections and their keys. Types: ``str``, ``int``, ``float``, ``bool``, ``list[int]``,
#: ``list[str]``, and unions written ``a|b``; ``path|bool``: a path, ``true`` for the default
#: path, ``false`` for none.
SCHEMA = {
    "data": {
        "required": True,
        "doc": "Where the rows come from: exactly one of generate, path, ingest.",
        "keys": {
            "generate": _key("str", choices=("mixture", "shape"),
                             doc="write synthetic data to `store`: a Gaussian mixture or a 2-D "
                                 "shape"),
            "path": _key("str", doc="a Zarr array or group (local path or fsspec URL)"),
            "ingest": _key("str|list[str]",
                           doc=".npy, .csv or .parquet files (globs allowed), converted into "
                               "the Zarr store `store` block by block"),
            "store": _key("str", doc="the Zarr group that generate and ingest write "
                                     "(default: OUTPUTS/data.zarr)"),
            "array": _key("str", doc="the array inside the group `path` (default X)"),
            "n_samples": _key("int", 100_000, "rows to generate", low=1),
            "n_features": _key("int", 8, "features of a generated mixture", low=1),
            "n_components": _key("int", 4, "components of a generated mixture", low=1),
            "separation": _key("float", 6.0, "distance between generated means in standard "
                                             "deviations", low=0),
            "shape": _key("str", "donut", "the 2-D shape to generate",
                          choices=("ring", "donut", "banana", "cosine", "funnel", "spiral")),
            "seed": _key("int", 0, "seed of the generated rows", low=0),
            "chunk_size": _key("int", doc="rows per stored chunk of generated or ingested data "
                                          "(default: about 16 MiB)", low=1),
            "dtype": _key("str", "float64", "dtype of generated or ingested rows",
                          choices=("float32", "float64")),
            "columns": _key("list[str]", doc="columns to ingest from CSV (with a header) or "
                                             "Parquet files (default: all)"),
            "delimiter": _key("str", ",", "CSV field separator"),
            "holdout_fraction": _key("float", 0.0, "the last rows held out of every fit and "
                                                   "scored, to compare models", low=0),
            "overwrite": _key("bool", False, "replace a store holding other data (a store "
                                             "with the same data is reused)"),
        },
    },
    "model": {
        "required": True,
        "many": True,
        "doc": "The estimator: `name` and its constructor parameters; [[model]] to compare.",
        "keys": {
            "name": _key("str", required=True, doc="the model: gmm, skew, dgmm, gmn, squared",
                         choices=("gmm", "skew", "dgmm", "gmn", "squared")),
            "label": _key("str", doc="name of this model in outputs and comparisons "
                                     "(default: name)"),
        },
    },
    "selection": {
        "doc": "Fit a grid of Gaussian mixtures in shared passes (dmix.select) and keep the "
               "best; [model] gives the other options (name = 'gmm').",
        "keys": {
            "n_components": _key("list[int]", required=True, doc="the numbers of components",
                                 low=1),
            "covariance_types": _key("list[str]", ["full"], "the covariance types",
                                     choices=("full", "tied", "tied_full", "diag",
                                              "spherical", "tied_diag", "tied_spherical")),
            "criterion": _key("str", "bic", "lower is better", choices=("bic", "aic", "icl")),
        },
    },
    "cluster": {
        "doc": "Where the work runs: a local cluster (default), a scheduler `address`, or "
               "`gpus`.",
        "keys": {
            "address": _key("str", doc="a running Dask scheduler, e.g. tcp://host:8786"),
            "n_workers": _key("int", doc="worker processes of the local cluster (default: one "
                                         "per core)", low=1),
            "threads_per_worker": _key("int", 1, "threads per local worker", low=1),
            "memory_limit": _key("str|int", "auto", "memory limit per local worker, e.g. "
                                                    "'2GiB', or bytes"),
            "gpus": _key("str|int", doc="'all' or N: a local cluster of one worker per GPU"),
            "dashboard_address": _key("str", ":8787", "where a local cluster serves its "
                                                      "dashboard (':0': a free port)"),
        },
    },
    "checkpoint": {
        "doc": "Checkpoint every fit; resume = true continues the latest checkpoint.",
        "keys": {
            "directory": _key("str", required=True, doc="checkpoint directory or URL (one "
                                                        "subdirectory per compared model)"),
            "resume": _key("bool", False, "continue from the latest checkpoint if there is "
                                          "one"),
            "every": _key("int", 1, "iterations between checkpoints", low=1),
            "keep": _key("int", 3, "complete checkpoints kept", low=1),
        },
    },
    "outputs": {
        "doc": "What the run writes; paths are relative to `directory`.",
        "keys": {
            "directory": _key("str", doc="where the outputs go (default: "
                                         "dmix-out/PIPELINE_NAME)"),
            "model": _key("path|bool", True, "the fitted model (dmix.load reads it)"),
            "labels": _key("path|bool", True, "Zarr group with `labels` (n,) int64"),
            "scores": _key("path|bool", True, "Zarr group with `log_density` (n,) float64"),
            "proba": _key("bool", False, "also write the responsibilities `proba` (n, K)"),
            "report": _key("path|bool", True, "the HTML report"),
            "overwrite": _key("bool", True, "replace the outputs of an earlier run"),
        },
    },
}

#: Estimator parameters that other sections set (or that a file cannot hold).
RESERVED = {"client": "it is made from [cluster]", "checkpoint": "use [checkpoint]",
            "checkpoint_every": "use [checkpoint] every", "checkpoint_keep":
            "use [checkpoint] keep"}


@dataclass
class Pipeline:
    """A validated pipeline: every section with its defaults filled in.

    Attributes
    ----------
    path : str
        The file (``"<string>"`` for text).
    name : str
        The file's stem, the default output directory's name.
    data, cluster, outputs : dict
    models : list of dict
        One per ``[model]``/``[[model]]``: ``name``, ``label``, and ``options`` (the
        estimator's parameters).
    selection, checkpoint : dict or None
    """

    path: str
    name: str
    data: dict
    models: list
    cluster: dict
    outputs: dict
    selection: dict | None = None
    checkpoint: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)
    _checker: object = field(default=None, repr=False)


# -- where a key is ---------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(#.*)?$")


def find_line(lines: list[str], section: str, key: str | None, index: int = 0) -> int | None:
    """1-based line of ``key`` in ``[section]`` (the ``index``-th ``[[section]]``), or of the
    section header when ``key`` is None; None if it is not written in the file."""
    current, seen = None, -1
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=") if key else None
    for number, line in enumerate(lines, 1):
        m = _HEADER.match(line)
        if m:
            current = m.group(2).strip("\"' ")
            if current == section:
                seen += 1
                if key is None and seen == index:
                    return number
            continue
        if current == section and seen == index and pattern and pattern.match(line):
            return number
    return None


# -- types ------------------------------------------------------------------------------------


def _is(value, type_: str) -> bool:
    if type_ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if type_ in ("str", "path"):
        return isinstance(value, str)
    if type_ == "bool":
        return isinstance(value, bool)
    if type_.startswith("list["):
        return isinstance(value, list) and all(_is(v, type_[5:-1]) for v in value)
    raise AssertionError(type_)


_TYPE_WORDS = {"str": "a string", "path": "a path", "int": "an integer", "float": "a number",
               "bool": "true or false", "list[int]": "a list of integers",
               "list[str]": "a list of strings"}


def _describe(type_: str) -> str:
    return " or ".join(_TYPE_WORDS[t] for t in type_.split("|"))


class _Checker:
    """Raises :class:`PipelineError` with the file, the line and the valid names."""

    def __init__(self, path: str, text: str, overrides: dict):
        self.path = path
        self.lines = text.splitlines()
        self.overrides = overrides  # (section, key) -> the --set text

    def fail(self, section: str, key: str | None, message: str, index: int = 0):
        where = self.path
        if (section, key) in self.overrides:
            where += f", --set {self.overrides[section, key]}"
        else:
            line = find_line(self.lines, section, key, index)
            if line is None and key is not None:
                line = find_line(self.lines, section, None, index)
            if line is not None:
                where += f", line {line}"
        raise PipelineError(f"{where}: {message}")

    def unknown(self, section, key, valid, index=0, what="key"):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        self.fail(section, key, f"unknown {what} {key!r} in [{section}].{hint} Valid "
                                f"{what}s: {', '.join(sorted(valid))}.", index)

    def value(self, section, key, spec, value, index=0):
        types = spec["type"].split("|")
        if not any(_is(value, "bool" if t == "path" and isinstance(value, bool) else t)
                   for t in types):
            self.fail(section, key, f"[{section}] {key} must be {_describe(spec['type'])}; "
                                    f"got {value!r} ({type(value).__name__}).", index)
        items = value if isinstance(value, list) else [value]
        if spec["choices"] is not None:
            for v in items:
                if isinstance(v, str) and v not in spec["choices"]:
                    self.fail(section, key, f"[{section}] {key} = {v!r} is not one of "
                                            f"{', '.join(spec['choices'])}.", index)
        if spec["low"] is not None:
            for v in items:
                if isinstance(v, int | float) and not isinstance(v, bool) and v < spec["low"]:
                    self.fail(section, key, f"[{section}] {key} must be >= {spec['low']}; "
                                            f"got {v!r}.", index)
        return value

    def section(self, name: str, table, index: int = 0, extra=()) -> dict:
        """``table`` checked against ``SCHEMA[name]``, with defaults; ``extra``: other valid
        keys, kept as they are."""
        keys = SCHEMA[name]["keys"]
        if not isinstance(table, dict):
            self.fail(name, None, f"[{name}] must be a table; got {type(table).__name__}.")
        out = {}
        for key, value in table.items():
            if key in keys:
                out[key] = self.value(name, key, keys[key], value, index)
            elif key in extra:
                out[key] = value
            else:
                self.unknown(name, key, [*keys, *extra], index)
        for key, spec in keys.items():
            if key not in out:
                if spec["required"]:
                    self.fail(name, None, f"[{name}] is missing the required key {key!r} "
                                          f"({spec['doc']}).", index)
                out[key] = spec["default"]
        return out


# -- --set ------------------------------------------------------------------------------------


def parse_set(text: str) -> tuple[list[str], object]:
    """``section.key=value`` (or ``model.LABEL.key=value``) -> (path, value). The value is
    read as TOML (``3``, ``true``, ``[1, 2]``, ``"a"``); anything else is a string."""
    if "=" not in text:
        raise PipelineError(f"--set {text}: expected SECTION.KEY=VALUE.")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) not in (2, 3) or not all(parts):
        raise PipelineError(f"--set {text}: expected SECTION.KEY=VALUE (or "
                            "model.LABEL.KEY=VALUE).")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def _apply_sets(raw: dict, sets: list[str]) -> dict:
    """Apply ``--set`` texts to the parsed file; returns {(section, key): text}."""
    where = {}
    for text in sets:
        parts, value = parse_set(text)
        section = parts[0]
        if section not in SCHEMA:
            raise PipelineError(f"--set {text}: unknown section {section!r}; the sections are "
                                f"{', '.join(SCHEMA)}.")
        table = raw.setdefault(section, {})
        if len(parts) == 3:
            if section != "model":
                raise PipelineError(f"--set {text}: only model.LABEL.KEY has three parts.")
            models = table if isinstance(table, list) else [table]
            targets = [m for m in models if m.get("label", m.get("name")) == parts[1]]
            if not targets:
                labels = [m.get("label", m.get("name")) for m in models]
                raise PipelineError(f"--set {text}: no model labelled {parts[1]!r}; the models "
                                    f"are {labels}.")
        else:
            targets = table if isinstance(table, list) else [table]
        for target in targets:
            target[parts[-1]] = value
        where[section, parts[-1]] = text
    return where


# -- loading ----------------------------------------------------------------------------------


def load_pipeline(path_or_text, sets=(), *, name: str | None = None) -> Pipeline:
    """Read and validate a pipeline.

    Parameters
    ----------
    path_or_text : str or os.PathLike
        A TOML file, or TOML text (when it contains a newline or ``[``).
    sets : sequence of str
        ``section.key=value`` overrides applied before validation (``dmix run --set``).
    name : str, optional
        The pipeline's name (default: the file's stem).

    Returns
    -------
    Pipeline

    Raises
    ------
    PipelineError
        For a TOML syntax error, an unknown section or key, a wrong type or value, or a missing
        required key; the message names the key, its line and the valid names.
    """
    text_given = isinstance(path_or_text, str) and ("\n" in path_or_text or "[" in path_or_text)
    if text_given:
        path, text = "<string>", path_or_text
    else:
        path = os.fspath(path_or_text)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise PipelineError(f"Cannot read the pipeline {path!r}: {exc.strerror}.") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{path}: not valid TOML: {exc}.") from None
    check = _Checker(path, text, _apply_sets(raw, list(sets)))
    for section in raw:
        if section not in SCHEMA:
            check.unknown(section, section, list(SCHEMA), what="section")
    for section, spec in SCHEMA.items():
        if spec.get("required") and section not in raw:
            check.fail(section, None, f"the required section [{section}] is missing "
                                      f"({spec['doc']}).")
    data = check.section("data", raw["data"])
    sources = [k for k in ("generate", "path", "ingest") if data[k] is not None]
    if len(sources) != 1:
        check.fail("data", sources[1] if sources else None,
                   "[data] needs exactly one of generate, path or ingest; got "
                   f"{', '.join(sources) if sources else 'none'}.")
    if not data["holdout_fraction"] < 1:
        check.fail("data", "holdout_fraction", "[data] holdout_fraction must be < 1; got "
                                               f"{data['holdout_fraction']!r}.")
    models = _models(check, raw["model"])
    selection = None
    if "selection" in raw:
        selection = check.section("selection", raw["selection"])
        if len(models) != 1 or models[0]["name"] != "gmm":
            check.fail("model", "name", "[selection] fits Gaussian mixtures: give one [model] "
                                        "with name = 'gmm'.")
        for key in ("n_components", "covariance_type"):
            if key in models[0]["options"]:
                check.fail("model", key, f"[model] {key} is chosen by [selection]; remove it.")
    cluster = check.section("cluster", raw.get("cluster", {}))
    local = [k for k in ("n_workers", "gpus") if cluster[k] is not None]
    if cluster["address"] is not None and local:
        check.fail("cluster", local[0], f"[cluster] {local[0]} is an option of a local "
                                        "cluster; it cannot go with address.")
    gpus = cluster["gpus"]
    if isinstance(gpus, str) and gpus != "all" or isinstance(gpus, int) and gpus < 1:
        check.fail("cluster", "gpus", f"[cluster] gpus must be 'all' or a positive integer; "
                                      f"got {gpus!r}.")
    checkpoint = check.section("checkpoint", raw["checkpoint"]) if "checkpoint" in raw else None
    outputs = check.section("outputs", raw.get("outputs", {}))
    stem = name or (os.path.splitext(os.path.basename(path))[0] if not text_given
                    else "pipeline")
    return Pipeline(path=path, name=stem, data=data, models=models, cluster=cluster,
                    outputs=outputs, selection=selection, checkpoint=checkpoint, raw=raw,
                    _checker=check)


def _models(check: _Checker, tables) -> list[dict]:
    """``[model]`` or ``[[model]]`` entries: name, label, and the estimator's options."""
    from dmix._registry import MODELS, estimator_classes

    tables = tables if isinstance(tables, list) else [tables]
    classes = estimator_classes()
    models, labels = [], set()
    for i, table in enumerate(tables):
        if not isinstance(table, dict) or not isinstance(table.get("name"), str) or (
                table["name"] not in MODELS):
            check.section("model", table if isinstance(table, dict) else {}, i,
                          extra=[k for k in table if k not in ("name", "label")]
                          if isinstance(table, dict) else ())
        cls = classes[MODELS[table["name"]]]
        params = [p for p in cls._param_names() if p not in RESERVED]
        for key in table:
            if key in RESERVED:
                check.fail("model", key, f"[model] {key} cannot be set here: {RESERVED[key]}.",
                           i)
        own = check.section("model", table, i, extra=params)
        label = own["label"] or own["name"]
        if not re.fullmatch(r"[A-Za-z0-9_-]+", label) or label in labels:
            check.fail("model", "label" if own["label"] else "name",
                       f"[model] label {label!r} must be unique and made of letters, digits, "
                       "'_' and '-' (give each [[model]] a label).", i)
        labels.add(label)
        options = {k: v for k, v in own.items() if k not in ("name", "label")}
        models.append({"name": own["name"], "label": label, "cls": cls, "options": options})
    return models
