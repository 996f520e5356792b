"""Models and the shared layers they are built from (one model per file, named after its class)."""
