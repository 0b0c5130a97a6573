"""The science: models, erasers, fine-tuning and evaluation. No Ray or MLflow here (the layout rule: README, Layout)."""
