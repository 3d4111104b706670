"""The one layer-by-layer pipeline (sequential.py), its stages (stages.py), and what they move:
the layer runner, the statistics probe, block building and refits, the gradient pass."""
