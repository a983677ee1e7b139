"""Where the graph comes from: model files, example inputs, and the two tracers."""
