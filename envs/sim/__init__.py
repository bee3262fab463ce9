"""``sim``: an environment for exercising the executor at cluster scale without the hardware.

Its job holds whatever the spec reserves (8 GPUs by default: logical GPUs on a simulated Ray
cluster are enough) for a duration drawn from a configured distribution, then leaves the knob
values it ran with; the frozen evaluator scores them on a fixed smooth surface. Durations and
outcomes are deterministic in (knobs, seed), so a rerun of the same idea takes as long:

- a fixed training budget ``budget_s`` (the thesis fixes each job's training time) times a
  small jitter, plus start-up;
- ``fail_rate``: the idea crashes part-way (an idea failure, reward 0);
- ``straggler_rate``: the job runs ``straggler_slowdown`` times as long (a slow node, a slow
  evaluation): the tail that group deadlines and straggler cuts are for.

The distribution's settings live in the codebase's ``config.json`` under ``durations`` (not a
knob: the ideator cannot change them); ``benchmarks/rl.py`` sets them per run with
``base_config`` overrides.
"""
