"""Neeko: many role-play characters from one base LLM and a bank of gated LoRA blocks."""

__version__ = "0.1.0"
