"""Thin integrations: PyTorch Lightning, Hugging Face transformers, and a decorator.

Each imports its framework only when used, so the agent's import stays light.
"""
