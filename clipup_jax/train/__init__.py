"""Training: losses, optimizer, train state and step, checkpoint manager, the loop."""
