"""Loader backends: one module per way of turning a split into device batches."""
