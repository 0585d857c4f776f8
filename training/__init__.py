"""Training recipes for the node's PE model (Ma et al. 2022). Imports the package; never imported by it."""
