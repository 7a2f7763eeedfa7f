"""llmprune.export stage (see docs/)."""
