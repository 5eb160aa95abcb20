"""Measuring models: perplexity (more tasks to come)."""
