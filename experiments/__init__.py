"""Scientific validation of the memorization indicator against held-out ground truth."""
