"""Benchmarks: what torchloom costs against plain PyTorch, measured side by side (``python -m tools.bench``)."""
