"""Starting training ranks on one or many machines."""
