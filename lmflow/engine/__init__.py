"""The engine: what happens to the units of work of a run, with no Prefect in it.

`unit` is the one lifecycle of a unit (a top-level step, a map item, a checkpoint
step); `scheduler` decides which units are ready and hands them to an `Executor`;
`runtime` is the run's session (backends, models, resolved options, cache keys) and
`records` its record and journal; `recovery` handles what a killed run left behind;
`working_directory` moves the process to the spec's folder while runs go on.
The Prefect executor lives with the flow (lmflow.prefect.flow); nothing here imports
Prefect (tests/test_layout.py keeps it so).
"""
