"""Real image data for the lab: the IDX reader and Fashion-MNIST (embedded subset or full files)."""
