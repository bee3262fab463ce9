"""``toy``: a seconds-long research environment for tests, demos and scheduler benchmarks.

The job fits a line to noisy training points by gradient descent (knobs: learning rate,
steps, an optional extra sleep that stands in for a longer job) and saves the fitted
parameters; the frozen evaluator scores them on held-out points the job never sees:
value = 1 / (1 + validation MSE).
"""
