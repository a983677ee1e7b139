"""How a person sees what was done: ONNX files, DOT/SVG pictures, the report, reloadable artefacts."""
