"""Models and data that ship inside registry packages: aliases and where they live (bundled), converters of
bundled weights to HF folders (mobilenet), silver
named-entity labels for bundled text from a packaged spaCy model (silver)."""
