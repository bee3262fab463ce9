"""GRPO environment: an idea edits a policy-gradient post-training codebase; the job post-trains
SmolLM2-135M-Instruct on reasoning-gym problems within a fixed wall-clock budget, and a frozen
evaluator scores the saved checkpoint by greedy validation accuracy on held-out problems."""
