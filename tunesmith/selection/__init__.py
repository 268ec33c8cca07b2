"""Choosing a recipe: the search space (space), Optuna search (search), K-fold cross-validation (cv) and the
budgeted automatic fine-tuning that uses them (tune)."""
