"""Demo weights trained on synthetic phantoms: NOT for clinical use."""
