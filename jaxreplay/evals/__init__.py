"""Evaluations: forgetting metrics, multiple-choice scoring, toy tasks, lm-eval."""
