"""Sources: images, local contexts, OCI layouts."""
