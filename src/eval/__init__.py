"""A model over a split: predictions gathered once per sample, the metrics of each task, the
missing-modality removals, modality contributions, decision margins and the console tables."""
