"""llmprune.fedrecover stage (see docs/)."""
