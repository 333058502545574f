"""Training stages of the miniature models (run on CPU, fp32, resumable)."""
