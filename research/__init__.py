"""Research code beside the library: the papers' experiments (``research.paper``) and the probes."""
