"""The names of what a trial reports, for the modules that read reports without running trials (tracking,
the report, resuming): importing them costs nothing (orchestrator/trial.py imports torch).

Reported every evaluation, as metric histories over `ft_step`, and once per trial. The covariates:
erase_distance = ||theta_erased - theta_base||, ft_distance = ||theta_now - theta_erased|| (effective weights,
so LoRA counts), data_closeness = cosine between the mean detector embedding of the fine-tuning images and of
the base model's images of the erased concept.
"""

CURVE_METRICS = ("presence", "resurgence", "retention", "ft_loss", "ft_distance", "resurgence_proxy")
ONCE_METRICS = (
    "presence_base",
    "presence_erased",
    "retention_base",
    "retention_erased",
    "erase_seconds",
    "erase_cached",
    "erase_distance",
    "data_closeness",
)
TIMING_METRICS = ("trial_seconds", "trial_cpu_seconds")  # logged with the last result
