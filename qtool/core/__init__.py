"""The numeric core: numpy arrays in, arrays out. Schemes, ranges, quantize/dequantize, bit
packing, error metrics and the optional C kernel. Never touches files, the terminal or the
CLI libraries (tests/test_architecture.py checks it)."""
