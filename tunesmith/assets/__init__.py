"""Models and data that ship inside registry packages: aliases and where they live (bundled), converters of
bundled weights to HF folders (mobilenet)."""
