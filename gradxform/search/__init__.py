"""``gradxform search``: asynchronous multi-objective search over passes, schedules and their options.

A space (:mod:`.space`) in the pipeline grammar with ranges and choices; trials compiled and trained
through :mod:`gradxform.api`, each in its own process (:mod:`.trial`), driven by Optuna workers that
share one storage (:mod:`.worker`, :mod:`.study`); objectives and the early-stopping rule of
multi-objective studies in :mod:`.objectives`; the front, plots and tables in :mod:`.report`.
"""
