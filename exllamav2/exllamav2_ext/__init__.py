"""The C++/CUDA kernel sources and `build.py`, the build facts setup.py and the just-in-time loader share."""
