"""Infrastructure: experiment specs, Ray Tune scheduling, MLflow tracking, the CLI. No tensor math here."""
