"""The Dockerfile frontend: Dockerfile text and build options in, an LLB graph and image config out."""
