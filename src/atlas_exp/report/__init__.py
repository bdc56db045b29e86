"""Looking at results: the selection inspector (and, later, the sweep report)."""
