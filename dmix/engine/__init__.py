"""The engine: how a fit is scheduled (the driver loop, the Dask passes, initialisation)."""

from dmix.engine.loop import EMResult, History, Monitor, estep_pass, fit_em, run_em

__all__ = ["EMResult", "History", "Monitor", "estep_pass", "fit_em", "run_em"]
