"""Pure tensor maths of carving and training: statistics, assignment, grouping, refits, budgets,
routing figures, mixtures. No modules, no hooks, no files: each function takes tensors and returns
tensors, so each is tested by hand on small cases."""
