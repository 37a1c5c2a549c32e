"""diffusers image-generation engine for dmr (see docs/diffusers.md)."""
