"""The names of what a trial reports, for the modules that read reports without running trials (tracking,
the report, resuming): importing them costs nothing (orchestrator/trial.py imports torch).

Reported every evaluation, as metric histories over `ft_step`, and once per trial. The covariates:
erase_distance = ||theta_erased - theta_base||, ft_distance = ||theta_now - theta_erased|| (effective weights,
so LoRA counts), data_closeness = cosine between the mean detector embedding of the fine-tuning images and of
the base model's images of the erased concept.
"""

CURVE_METRICS = (
    "presence",
    "resurgence",
    # 95% intervals of both over the presence_images images: Wilson for presence, Newcombe's hybrid score for
    # resurgence (methods/evaluation/intervals.py)
    "presence_lo",
    "presence_hi",
    "resurgence_lo",
    "resurgence_hi",
    "retention",
    "ft_loss",
    "ft_distance",
    "resurgence_proxy",
    "clip_score",  # utility (methods/evaluation/utility.py): after erasure (step 0) and at each round's end
    "fid",
)
# Logged like curves too: how many of the erased concept's images each detector class fired on (NudeNet's
# exposed parts), as `detected.<CLASS>`.
# With several erased concepts, each one's own presence and resurgence too (`presence.<name>`, ...).
CURVE_PREFIXES = ("detected.", "presence.", "resurgence.")
ONCE_METRICS = (
    "presence_base",
    "presence_erased",
    "retention_base",
    "retention_erased",
    "erase_seconds",
    "erase_cached",
    "erase_distance",
    "data_closeness",
    "presence_images",  # n: the images presence is a proportion of (per concept)
    "clip_score_base",
    "fid_base",
    "clip_score_erased",
    "fid_erased",
)
# Logged with the last result: the trial's own cost, so a campaign's device hours can be summed. Device
# seconds are the trial's wall seconds on a CUDA device (0 on the CPU); peak device memory is torch's peak
# allocation during the trial; peak RSS is the worker process's high-water mark (a reused worker's covers
# its earlier trials too).
TIMING_METRICS = (
    "trial_seconds",
    "trial_cpu_seconds",
    "trial_device_seconds",
    "trial_peak_device_mb",
    "trial_peak_rss_mb",
)


def curve_keys(result: dict) -> list[str]:
    """The keys of a report logged as histories over ft_step."""
    return [k for k in result if k in CURVE_METRICS or k.startswith(CURVE_PREFIXES)]
