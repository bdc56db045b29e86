"""Training: turning trajectories and step selections into supervised token sequences, and finetuning."""
