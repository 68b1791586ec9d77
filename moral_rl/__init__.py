"""Moral alignment of LLM agents with intrinsic rewards, in JAX."""
