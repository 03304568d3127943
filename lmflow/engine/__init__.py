"""The engine: what happens to the units of work of a run, with no Prefect in it.

`unit` is the one lifecycle of a unit (a top-level step, a map item, a checkpoint
step); `scheduler` decides which units are ready and hands them to an `Executor`.
The Prefect executor lives with the flow (lmflow.prefect.flow); nothing here imports
Prefect (tests/test_layout.py keeps it so).
"""
