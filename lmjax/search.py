"""Kept for sweep files written before `lmjax.sweep` became one package: they import
`from lmjax.search import Search, IntUniform`. New files import from `lmjax.sweep`."""

from lmjax.sweep.search import Search
from lmjax.sweep.space import Choice, IntUniform, LogUniform, Uniform

__all__ = ["Choice", "IntUniform", "LogUniform", "Search", "Uniform"]
