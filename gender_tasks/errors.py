"""The package's error base: problems a retry cannot fix (bad settings, bad data, a missing source).

The DAG turns these into failures without retries; anything else (a network blip, a lost worker)
is retried as Airflow's `retries` say.
"""


class PermanentError(ValueError):
    """Bad input or configuration; the message names the bad item and the fix."""
