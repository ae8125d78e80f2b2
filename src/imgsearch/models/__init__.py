"""Model files: export from registry packages (build time) and their manifest (run time)."""
