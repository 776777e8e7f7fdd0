"""The engine: solves an LLB graph with a content-addressed cache."""
