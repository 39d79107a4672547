"""What a run shows a person: scalars read back from its tensorboard events, plots, and Markdown reports."""
