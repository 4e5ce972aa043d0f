"""G-code files: the content-addressed store, its HTTP server, fetching from holders, .gjob import/export."""
