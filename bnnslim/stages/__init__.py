"""The stages of the command line: each runs the in-memory algorithms over a run directory
(model source, manifest, checkpoints, locks, resume). ``bnnslim.api`` has the same stages without files."""
