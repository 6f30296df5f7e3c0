"""The robustness lab (needs the ``torch`` extra): corruptions, datasets, models, evaluation."""
