"""The science: models, erasers, fine-tuning and evaluation. No Ray or MLflow here (STYLE.md rule 1)."""
