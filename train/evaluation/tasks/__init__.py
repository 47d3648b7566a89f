"""lm-evaluation-harness tasks that need no download: held-out Python code (multiple choice, line
completion, perplexity) and the passkey and needle retrieval of train/evaluation/retrieval.py.

`python -m train.evaluation.harness` puts this folder on the task path. The `.py` files here are
read by the task YAMLs (`!function module.name`); `build_pycode` writes the code tasks' data.
"""
