"""Evaluation of dense and carved models: perplexity (GPTQ protocol) and routing analysis."""
