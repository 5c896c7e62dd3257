"""Fake xformers whose CUDA runtime library is missing."""

raise OSError("libcudart.so.12: cannot open shared object file: No such file or directory")
