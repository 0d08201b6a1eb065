"""One module per runbook flow. Flows orchestrate and decide; the tasks do the I/O."""
