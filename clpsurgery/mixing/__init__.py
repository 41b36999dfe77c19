"""Methods of initialisation and the combine: neighbour search, weighting, the CPU and GPU combine, the float64 reference. Arrays in, arrays out, no files."""
