"""Small utilities shared by every layer (no torch-model or Lightning logic here)."""
