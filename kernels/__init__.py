"""CUDA sanitization and preprocessing kernels with their NumPy references."""
