"""Head model (FLAME format), UV machinery and the triangle rasterizer — a leaf library."""
