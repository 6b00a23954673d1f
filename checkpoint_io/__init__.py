"""Checkpoints: find, convert (the embedded GGUF models), load and save them, and the one atomic writer that every
output goes through."""
