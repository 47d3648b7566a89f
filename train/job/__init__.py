"""The job around the trainer: the launcher (`python -m train.job.launch`, torchrun with a one-line
failure report), the supervision of its workers and run directory, and how every entry point reports
a failure (`cli.py`, `errors.py`)."""
