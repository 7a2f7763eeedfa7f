"""llmprune.compress stage (see docs/)."""
