"""EXL2 conversion: calibration, GPTQ measurement and quantization, layout optimization, output (issue 4).

Entry point: convert.py at the repository root (upstream's flags).
"""
