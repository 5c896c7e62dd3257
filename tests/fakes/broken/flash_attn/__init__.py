"""Fake flash_attn whose compiled extension does not match the installed torch."""

raise ImportError(
    "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
)
