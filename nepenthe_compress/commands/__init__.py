"""Click commands, one file per verb. Each one parses options, calls the library and renders."""
